//! Self-tests of the harness: a copy of a RAG case with one defect each must make the checks fail,
//! and fail at the defect (not somewhere else by accident).

use crate::common::{lookup, Checker, Fixture};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), &dst)
                .with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

fn at<'a>(v: &'a mut Value, path: &str) -> Result<&'a mut Value> {
    let mut cur = v;
    for part in path.split('/') {
        cur = match cur {
            Value::Object(m) => m.get_mut(part).with_context(|| format!("no `{part}`"))?,
            Value::Array(a) => a
                .get_mut(part.parse::<usize>()?)
                .with_context(|| format!("no index {part}"))?,
            _ => bail!("`{part}`: not a container"),
        };
    }
    Ok(cur)
}

/// One defect: what it does to expected.json, and a string one of the failures must contain.
type Mutation = (&'static str, fn(&mut Value) -> Result<String>);

const MUTATIONS: &[Mutation] = &[
    ("one section removed (`gradients`)", |v| {
        v.as_object_mut()
            .context("expected.json")?
            .remove("gradients")
            .context("no gradients")?;
        Ok("gradients".into())
    }),
    (
        "one field renamed (`retrieval/doc_scores` -> `doc_scorez`)",
        |v| {
            let r = at(v, "retrieval")?.as_object_mut().context("retrieval")?;
            let x = r.remove("doc_scores").context("no doc_scores")?;
            r.insert("doc_scorez".into(), x);
            Ok("retrieval/doc_scorez".into())
        },
    ),
    (
        "one gradient zeroed (first generator tensor of `gradients/full_gradients`)",
        |v| {
            let full = at(v, "gradients/full_gradients")?
                .as_object_mut()
                .context("full_gradients")?;
            let (name, g) = full
                .iter_mut()
                .find(|(n, _)| n.contains("generator"))
                .context("no generator tensor in full_gradients")?;
            for x in g
                .get_mut("grad")
                .and_then(|g| g.as_array_mut())
                .context("grad")?
            {
                *x = Value::from(0.0);
            }
            Ok(name.clone())
        },
    ),
    (
        "one log-prob nudged by 1e-4 (top-1 of `forward/logprobs_top5` at row 0, t 0)",
        |v| {
            let x = at(v, "forward/logprobs_top5/logprobs/0/0/0")?;
            let old = x.as_f64().context("not a number")?;
            *x = Value::from(old + 1e-4);
            Ok("logprobs_top5".into())
        },
    ),
];

pub fn run(root: &Path, cases: &[(String, &'static str)], manifest: &Value, total: &mut Checker) {
    // The first RAG case of the manifest that is a Token case (smaller than Sequence cases).
    let pick = cases
        .iter()
        .filter(|(_, k)| *k == "rag")
        .map(|(n, _)| n.clone())
        .find(|n| {
            Fixture::load(&root.join(n)).is_ok_and(|fx| {
                lookup(&fx.expected, "model_class")
                    .is_ok_and(|m| m.as_str() == Some("RagTokenForGeneration"))
            })
        });
    let Some(case) = pick else {
        return total.check("self-tests", || bail!("no RAG-Token case to mutate"));
    };
    let tmp: PathBuf =
        std::env::temp_dir().join(format!("rustrag-parity-selftest-{}", std::process::id()));
    for (what, mutate) in MUTATIONS {
        total.check(&format!("self-test [{case}]: {what} must fail"), || {
            let dir = tmp.join(&case);
            let _ = std::fs::remove_dir_all(&tmp);
            copy_dir(&root.join(&case), &dir)?;
            let path = dir.join("expected.json");
            let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
            let needle = mutate(&mut v)?;
            std::fs::write(&path, serde_json::to_string(&v)?)?;
            let fx = Fixture::load(&dir)?;
            let mut c = Checker::new(&case);
            c.quiet = true;
            crate::run_case(&fx, "rag", manifest, &mut c);
            let _ = std::fs::remove_dir_all(&tmp);
            if c.failed.is_empty() {
                bail!("the mutated case passed all {} checks", c.passed);
            }
            if !c.failed.iter().any(|f| f.contains(&needle)) {
                bail!(
                    "{} checks failed, none at `{needle}`: {:?}",
                    c.failed.len(),
                    c.failed
                );
            }
            println!(
                "  self-test {what}: {} of {} checks failed, e.g. {}",
                c.failed.len(),
                c.failed.len() + c.passed,
                c.failed
                    .iter()
                    .find(|f| f.contains(&needle))
                    .map(|f| f.chars().take(200).collect::<String>())
                    .unwrap_or_default()
            );
            Ok(())
        });
    }
}
