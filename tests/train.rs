//! Training tests: the optimiser against torch (tests/fixtures/adamw_reference.json, written by
//! tests/fixtures/make_train_reference.py) and RAG fine-tuning on the parity fixtures.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor, Var};
use rustrag::train::optim::{clip_grad_norm, AdamW, AdamWConfig, LinearSchedule};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// f32 tolerance of the optimiser fixture: max |got − torch| ≤ 1e-6 · max(1, max |torch|) per tensor.
/// (AdamW divides by sqrt(v) + 1e-8; torch and candle round the same f32 operations, but torch's
/// clip coefficient is a float32 norm while ours accumulates in f64.)
const OPT_TOL: f64 = 1e-6;

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn floats(v: &Value) -> Result<Vec<f32>> {
    v.as_array()
        .context("expected an array")?
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32).context("non-number"))
        .collect()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1f64, |m, &w| m.max(w.abs() as f64));
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs()));
    assert!(
        err <= tol * scale,
        "{what}: max abs error {err:e} > {tol:e} × {scale}\n got {got:?}\nwant {want:?}"
    );
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn adamw_clipping_and_schedule_match_torch() -> Result<()> {
    let path = fixture_path("adamw_reference.json");
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    let dev = Device::Cpu;
    let c = &fx["config"];
    let config = AdamWConfig {
        lr: c["lr"].as_f64().context("lr")?,
        beta1: c["beta1"].as_f64().context("beta1")?,
        beta2: c["beta2"].as_f64().context("beta2")?,
        eps: c["eps"].as_f64().context("eps")?,
        weight_decay: c["weight_decay"].as_f64().context("weight_decay")?,
    };
    let schedule = LinearSchedule {
        warmup_steps: fx["schedule"]["warmup_steps"].as_u64().context("warmup")?,
        total_steps: fx["schedule"]["total_steps"].as_u64().context("total")?,
    };
    for (i, want) in fx["schedule"]["lr_lambda"]
        .as_array()
        .context("lr_lambda")?
        .iter()
        .enumerate()
    {
        let want = want.as_f64().context("lambda")?;
        assert!((schedule.lambda(i as u64) - want).abs() < 1e-12, "lambda({i})");
    }
    let names: Vec<String> = fx["names"]
        .as_array()
        .context("names")?
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    let shape = |n: &str| -> Vec<usize> {
        fx["shapes"][n]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect()
    };
    let params: Vec<(String, Var)> = names
        .iter()
        .map(|n| {
            let t = Tensor::from_vec(floats(&fx["initial"][n])?, shape(n), &dev)?;
            Ok((n.clone(), Var::from_tensor(&t)?))
        })
        .collect::<Result<_>>()?;
    let mut opt = AdamW::new(params.clone(), config.clone())?;
    let max_norm = fx["max_grad_norm"].as_f64().context("max_grad_norm")?;
    let steps = fx["steps"].as_array().context("steps")?;
    assert_eq!(steps.len(), 3, "the fixture records 3 steps");
    for (k, step) in steps.iter().enumerate() {
        let lr = config.lr * schedule.lambda(k as u64);
        assert!((lr - step["lr"].as_f64().unwrap()).abs() < 1e-15, "step {k} lr");
        let mut grads: Vec<Option<Tensor>> = names
            .iter()
            .map(|n| {
                Ok(Some(Tensor::from_vec(
                    floats(&step["grads"][n])?,
                    shape(n),
                    &dev,
                )?))
            })
            .collect::<Result<_>>()?;
        let norm = clip_grad_norm(&mut grads, max_norm)?;
        let want_norm = step["total_norm"].as_f64().unwrap();
        assert!(
            (norm - want_norm).abs() <= 1e-6 * want_norm,
            "step {k}: norm {norm} vs {want_norm}"
        );
        for (n, g) in names.iter().zip(&grads) {
            assert_close(
                &format!("step {k} clipped grad {n}"),
                &flat(g.as_ref().unwrap()),
                &floats(&step["clipped_grads"][n])?,
                OPT_TOL,
            );
        }
        opt.step(&grads, lr)?;
        let state = opt.state_tensors()?;
        for (n, var) in &params {
            assert_close(
                &format!("step {k} param {n}"),
                &flat(var.as_tensor()),
                &floats(&step["params_after"][n])?,
                OPT_TOL,
            );
            assert_close(
                &format!("step {k} exp_avg {n}"),
                &flat(&state[&format!("exp_avg.{n}")]),
                &floats(&step["exp_avg"][n])?,
                OPT_TOL,
            );
            assert_close(
                &format!("step {k} exp_avg_sq {n}"),
                &flat(&state[&format!("exp_avg_sq.{n}")]),
                &floats(&step["exp_avg_sq"][n])?,
                OPT_TOL,
            );
        }
    }
    // Saving and restoring the moments resumes the same trajectory.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("optimizer.safetensors");
    let n = opt.save(&file)?;
    let copy: Vec<(String, Var)> = params
        .iter()
        .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
        .collect::<Result<_>>()?;
    let mut restored = AdamW::new(copy.clone(), config.clone())?;
    restored.load(&file, n)?;
    let g: Vec<Option<Tensor>> = params
        .iter()
        .map(|(_, v)| Some(v.as_tensor().ones_like().unwrap()))
        .collect();
    opt.step(&g, 1e-3)?;
    restored.step(&g, 1e-3)?;
    for ((_, a), (_, b)) in params.iter().zip(&copy) {
        assert_eq!(flat(a.as_tensor()), flat(b.as_tensor()));
    }
    Ok(())
}
