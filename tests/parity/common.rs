//! Fixture reading and the check counter shared by every parity module.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Relative tolerance for f32 values: max |got - expected| / max |expected| per compared array.
pub const RTOL: f64 = 1e-4;

/// One case directory: `expected.json` plus its `tensors.safetensors` (if any).
pub struct Fixture {
    pub dir: PathBuf,
    pub name: String,
    pub expected: Value,
    tensors: std::sync::OnceLock<HashMap<String, Tensor>>,
}

impl Fixture {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("expected.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let expected =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            name: dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            expected,
            tensors: Default::default(),
        })
    }

    /// Value at a `/`-separated path (object keys or array indices), e.g. `retrieval/doc_scores`.
    pub fn get(&self, path: &str) -> Result<&Value> {
        lookup(&self.expected, path)
            .with_context(|| format!("{}: expected.json has no `{path}`", self.name))
    }

    pub fn has(&self, path: &str) -> bool {
        lookup(&self.expected, path).is_ok()
    }

    /// Flattened floats at `path` (nested arrays; "inf"/"-inf"/"nan" strings allowed).
    pub fn f32s(&self, path: &str) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        flatten_f32(self.get(path)?, &mut out)
            .with_context(|| format!("{}: `{path}`", self.name))?;
        Ok(out)
    }

    /// A `[rows][cols]` integer array at `path`.
    pub fn ids2(&self, path: &str) -> Result<Vec<Vec<u32>>> {
        value_ids2(self.get(path)?).with_context(|| format!("{}: `{path}`", self.name))
    }

    /// An integer list at `path`.
    pub fn ids1(&self, path: &str) -> Result<Vec<u32>> {
        value_ids1(self.get(path)?).with_context(|| format!("{}: `{path}`", self.name))
    }

    pub fn strings(&self, path: &str) -> Result<Vec<String>> {
        self.get(path)?
            .as_array()
            .ok_or_else(|| anyhow!("{}: `{path}` is not an array", self.name))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .ok_or_else(|| anyhow!("`{path}`: non-string"))
            })
            .collect()
    }

    pub fn usize(&self, path: &str) -> Result<usize> {
        self.get(path)?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| anyhow!("{}: `{path}` is not an integer", self.name))
    }

    /// A tensor from `tensors.safetensors` by name.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let map = self.tensors.get_or_init(|| {
            candle_core::safetensors::load(self.dir.join("tensors.safetensors"), &Device::Cpu)
                .unwrap_or_default()
        });
        map.get(name)
            .cloned()
            .ok_or_else(|| anyhow!("{}: tensors.safetensors has no `{name}`", self.name))
    }
}

pub fn lookup<'a>(v: &'a Value, path: &str) -> Result<&'a Value> {
    let mut cur = v;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        cur = match cur {
            Value::Object(m) => m.get(part).ok_or_else(|| anyhow!("no key `{part}`"))?,
            Value::Array(a) => {
                let i: usize = part
                    .parse()
                    .map_err(|_| anyhow!("`{part}` is not an index"))?;
                a.get(i).ok_or_else(|| anyhow!("index {i} out of range"))?
            }
            _ => bail!("`{part}`: not a container"),
        };
    }
    Ok(cur)
}

pub fn flatten_f32(v: &Value, out: &mut Vec<f32>) -> Result<()> {
    match v {
        Value::Array(a) => a.iter().try_for_each(|x| flatten_f32(x, out)),
        Value::Number(n) => {
            out.push(n.as_f64().ok_or_else(|| anyhow!("bad number"))? as f32);
            Ok(())
        }
        Value::String(s) => {
            out.push(match s.as_str() {
                "inf" => f32::INFINITY,
                "-inf" => f32::NEG_INFINITY,
                "nan" => f32::NAN,
                other => bail!("unexpected string `{other}` in a float array"),
            });
            Ok(())
        }
        other => bail!("unexpected value {other} in a float array"),
    }
}

pub fn value_ids1(v: &Value) -> Result<Vec<u32>> {
    v.as_array()
        .ok_or_else(|| anyhow!("not an array"))?
        .iter()
        .map(|x| {
            x.as_u64()
                .map(|x| x as u32)
                .ok_or_else(|| anyhow!("non-integer id {x}"))
        })
        .collect()
}

pub fn value_ids2(v: &Value) -> Result<Vec<Vec<u32>>> {
    v.as_array()
        .ok_or_else(|| anyhow!("not an array"))?
        .iter()
        .map(value_ids1)
        .collect()
}

/// Counts checks and collects failures of one case.
pub struct Checker {
    pub case: String,
    pub passed: usize,
    pub failed: Vec<String>,
}

impl Checker {
    pub fn new(case: &str) -> Self {
        Self {
            case: case.to_string(),
            passed: 0,
            failed: Vec::new(),
        }
    }

    fn record(&mut self, name: &str, ok: Result<()>) {
        match ok {
            Ok(()) => self.passed += 1,
            Err(e) => {
                let msg = format!("{}: {name}: {e:#}", self.case);
                eprintln!("FAIL {msg}");
                self.failed.push(msg);
            }
        }
    }

    /// Run a check that returns an error on mismatch (or on any failure to compute it).
    pub fn check(&mut self, name: &str, f: impl FnOnce() -> Result<()>) {
        let r = f();
        self.record(name, r);
    }

    /// f32 arrays equal within [`RTOL`] of the expected array's largest magnitude.
    pub fn close(&mut self, name: &str, got: &[f32], expected: &[f32]) {
        self.close_tol(name, got, expected, RTOL)
    }

    pub fn close_tol(&mut self, name: &str, got: &[f32], expected: &[f32], rtol: f64) {
        self.record(name, compare(got, expected, rtol));
    }

    /// Token ids equal exactly.
    pub fn ids<T: PartialEq + std::fmt::Debug>(&mut self, name: &str, got: &[T], expected: &[T]) {
        let r = if got == expected {
            Ok(())
        } else {
            Err(anyhow!(
                "ids differ:\n  got      {got:?}\n  expected {expected:?}"
            ))
        };
        self.record(name, r);
    }
}

pub fn compare(got: &[f32], expected: &[f32], rtol: f64) -> Result<()> {
    if got.len() != expected.len() {
        bail!("length {} != expected {}", got.len(), expected.len());
    }
    let scale = expected
        .iter()
        .filter(|x| x.is_finite())
        .fold(0f64, |m, x| m.max(x.abs() as f64))
        .max(1e-12);
    let mut worst = (0f64, 0usize);
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        if !e.is_finite() || !g.is_finite() {
            if g.to_bits() != e.to_bits() && !(g.is_nan() && e.is_nan()) && g != e {
                bail!("index {i}: got {g}, expected {e}");
            }
            continue;
        }
        let d = (*g as f64 - *e as f64).abs() / scale;
        if d > worst.0 {
            worst = (d, i);
        }
    }
    if worst.0 > rtol {
        let i = worst.1;
        bail!(
            "max relative error {:.3e} > {rtol:.0e} at index {i}: got {}, expected {}",
            worst.0,
            got[i],
            expected[i]
        );
    }
    Ok(())
}

/// Flatten any f32 tensor.
pub fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}
