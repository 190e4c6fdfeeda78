//! `metrics.png`: training loss (blue) and eval loss (red) over steps on top, eval EM (green) and F1
//! (orange) and retrieval recall (purple) in percent below. Drawn with plotters' bitmap backend only: no font dependency, so the
//! axes carry no text; the legend is this comment and the values are in `metrics.jsonl`.

use crate::train::rag::MetricLine;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

const SIZE: (u32, u32) = (900, 600);

/// Draw `lines` into a PNG at `path` (written through a temporary file and renamed).
pub fn plot_metrics(lines: &[MetricLine], path: &Path) -> Result<()> {
    let mut train = Vec::new();
    let (mut eval_loss, mut em, mut f1, mut recall) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for l in lines {
        match l {
            MetricLine::Train(r) => train.push((r.step as f64, r.loss)),
            MetricLine::Eval(r) => {
                eval_loss.push((r.step as f64, r.eval_loss));
                em.push((r.step as f64, r.em));
                f1.push((r.step as f64, r.f1));
                if let Some(x) = r.recall {
                    recall.push((r.step as f64, x));
                }
            }
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .suffix(".png")
        .tempfile_in(dir)?;
    {
        let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
        let root = BitMapBackend::new(tmp.path(), SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (top, bottom) = root.split_vertically(SIZE.1 * 3 / 5);
        let max_step = train
            .iter()
            .chain(&eval_loss)
            .map(|p| p.0)
            .fold(1.0, f64::max);
        let losses: Vec<f64> = train
            .iter()
            .chain(&eval_loss)
            .map(|p| p.1)
            .filter(|v| v.is_finite())
            .collect();
        let lo = losses.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if lo.is_finite() && hi > lo {
            (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        } else if lo.is_finite() {
            (lo - 1.0, lo + 1.0)
        } else {
            (0.0, 1.0)
        };
        let mut chart = ChartBuilder::on(&top)
            .margin(12)
            .build_cartesian_2d(0f64..max_step, lo..hi)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(10)
            .y_labels(8)
            .x_label_formatter(&|_| String::new())
            .y_label_formatter(&|_| String::new())
            .draw()
            .map_err(|e| err(&e))?;
        let finite = |v: &[(f64, f64)]| -> Vec<(f64, f64)> {
            v.iter().copied().filter(|p| p.1.is_finite()).collect()
        };
        chart
            .draw_series(LineSeries::new(finite(&train), BLUE.stroke_width(2)))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(finite(&eval_loss), RED.stroke_width(3)))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(
                finite(&eval_loss)
                    .into_iter()
                    .map(|p| Circle::new(p, 4, RED.filled())),
            )
            .map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&bottom)
            .margin(12)
            .build_cartesian_2d(0f64..max_step, 0f64..100f64)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(10)
            .y_labels(11)
            .x_label_formatter(&|_| String::new())
            .y_label_formatter(&|_| String::new())
            .draw()
            .map_err(|e| err(&e))?;
        for (series, colour) in [
            (&em, GREEN),
            (&f1, RGBColor(255, 140, 0)),
            (&recall, RGBColor(128, 0, 160)),
        ] {
            chart
                .draw_series(LineSeries::new(
                    series.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(|e| err(&e))?;
            chart
                .draw_series(series.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    tmp.persist(path)
        .map_err(|e| anyhow!("renaming into {}: {e}", path.display()))?;
    Ok(())
}
