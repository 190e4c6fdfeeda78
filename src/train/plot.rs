//! `metrics.png`: training loss (blue) and eval loss (red) over steps on top, eval EM (green), F1
//! (orange) and retrieval recall (purple) in percent below, with axis labels and legends. Text is
//! drawn with DejaVu Sans Mono, embedded (`assets/`, Bitstream Vera licence), so plotting needs no
//! system fonts.

use crate::train::rag::MetricLine;
use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::Path;

const SIZE: (u32, u32) = (900, 600);
const FONT: &str = "rustrag-mono";

/// Register the embedded font once per process.
fn register_font() -> Result<()> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");
        plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok()
    });
    match ok {
        true => Ok(()),
        false => Err(anyhow!(
            "the embedded plot font is not a valid TrueType font"
        )),
    }
}

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
            MetricLine::Index(_) => {}
        }
    }
    let percents = [("EM", em), ("F1", f1), ("recall", recall)];
    plot_curves(path, "RAG loss per question", &train, &eval_loss, &percents)
}

/// Draw a training run: `train` and `eval_loss` `(step, loss)` points (either may be empty) on
/// top under `loss_caption`, the named `percents` series `(step, %)` below (up to three: green,
/// orange, purple).
pub fn plot_curves(
    path: &Path,
    loss_caption: &str,
    train: &[(f64, f64)],
    eval_loss: &[(f64, f64)],
    percents: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    register_font()?;
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
            .chain(eval_loss)
            .chain(percents.iter().flat_map(|s| &s.1))
            .map(|p| p.0)
            .fold(1.0, f64::max);
        let losses: Vec<f64> = train
            .iter()
            .chain(eval_loss)
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
            .caption(loss_caption, (FONT, 18))
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..max_step, lo..hi)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(10)
            .y_labels(8)
            .x_desc("step")
            .y_desc("loss")
            .label_style((FONT, 13))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .draw()
            .map_err(|e| err(&e))?;
        let finite = |v: &[(f64, f64)]| -> Vec<(f64, f64)> {
            v.iter().copied().filter(|p| p.1.is_finite()).collect()
        };
        chart
            .draw_series(LineSeries::new(finite(train), BLUE.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("train")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE.stroke_width(2)));
        // Runs without an eval loss (retriever training) get no empty legend entry.
        if !eval_loss.is_empty() {
            chart
                .draw_series(LineSeries::new(finite(eval_loss), RED.stroke_width(3)))
                .map_err(|e| err(&e))?
                .label("eval")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], RED.stroke_width(3)));
            chart
                .draw_series(
                    finite(eval_loss)
                        .into_iter()
                        .map(|p| Circle::new(p, 4, RED.filled())),
                )
                .map_err(|e| err(&e))?;
        }
        legend(&mut chart).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&bottom)
            .margin(12)
            .caption("evaluation (%)", (FONT, 18))
            .x_label_area_size(28)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..max_step, 0f64..100f64)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(10)
            .y_labels(11)
            .x_desc("step")
            .y_desc("%")
            .label_style((FONT, 13))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(|e| err(&e))?;
        let colours = [GREEN, RGBColor(255, 140, 0), RGBColor(128, 0, 160)];
        for (&(name, ref series), colour) in percents.iter().zip(colours) {
            chart
                .draw_series(LineSeries::new(
                    series.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(series.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                .map_err(|e| err(&e))?;
        }
        legend(&mut chart).map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    // tempfile creates 0600; a plot is for sharing.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(path)
        .map_err(|e| anyhow!("renaming into {}: {e}", path.display()))?;
    Ok(())
}

/// The series legend in the upper right corner.
fn legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
}
