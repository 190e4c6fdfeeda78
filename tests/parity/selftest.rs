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
    (
        "the smallest non-zero gradient norm set to zero (`gradients/grad_l2_norms_all`)",
        |v| {
            let norms = at(v, "gradients/grad_l2_norms_all")?
                .as_object_mut()
                .context("grad_l2_norms_all")?;
            let (name, x) = norms
                .iter_mut()
                .filter(|(n, _)| !crate::rag::zero_gradient("gradients/", n, None))
                .min_by(|a, b| {
                    let f = |x: &Value| x.as_f64().unwrap_or(f64::INFINITY);
                    f(a.1).total_cmp(&f(b.1))
                })
                .context("no norms")?;
            *x = Value::from(0.0);
            Ok(format!("{name}: norm"))
        },
    ),
    (
        "an unknown generate kwarg (`temperature` in generation/0)",
        |v| {
            at(v, "generation/0/kwargs")?
                .as_object_mut()
                .context("kwargs")?
                .insert("temperature".into(), Value::from(0.7));
            Ok("unknown generate kwarg `temperature`".into())
        },
    ),
    ("a shorter list (the last generate call dropped)", |v| {
        at(v, "generation")?
            .as_array_mut()
            .context("generation")?
            .pop();
        Ok("generation: every documented call".into())
    }),
    (
        "an expected HF error that we raise for another cause (generation/0 with num_beams 0)",
        |v| {
            let e = at(v, "generation/0")?
                .as_object_mut()
                .context("generation/0")?;
            e.insert(
                "error".into(),
                Value::from("RuntimeError: selected index k out of range [injected]"),
            );
            for k in ["output_ids", "decoded", "min_decision_margin"] {
                e.remove(k);
            }
            e.get_mut("kwargs")
                .and_then(|k| k.as_object_mut())
                .context("kwargs")?
                .insert("num_beams".into(), Value::from(0));
            Ok("another cause".into())
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
    // The case list: an unlisted directory, and a listed case without expected.json.
    for (what, extra, drop) in [
        (
            "a case directory not in manifest.json",
            Some("bogus-case"),
            None,
        ),
        (
            "a listed case without expected.json",
            None,
            Some(case.as_str()),
        ),
    ] {
        total.check(&format!("self-test: {what} must fail"), || {
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp)?;
            std::fs::copy(root.join("manifest.json"), tmp.join("manifest.json"))?;
            for (n, _) in cases {
                std::fs::create_dir_all(tmp.join(n))?;
                if Some(n.as_str()) != drop {
                    std::fs::write(tmp.join(n).join("expected.json"), "{}")?;
                }
            }
            if let Some(e) = extra {
                std::fs::create_dir_all(tmp.join(e))?;
            }
            let r = crate::case_list(&tmp, manifest);
            let _ = std::fs::remove_dir_all(&tmp);
            match r {
                Ok(_) => bail!("the case list was accepted"),
                Err(e) if format!("{e:#}").contains(extra.or(drop).unwrap_or_default()) => {
                    println!("  self-test {what}: {e:#}");
                    Ok(())
                }
                Err(e) => bail!("failed for another reason: {e:#}"),
            }
        });
    }
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
