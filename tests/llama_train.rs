//! Training a decoder-only generator: the one-pass teacher-forced forward and its gradients against
//! HF transformers (tests/fixtures/make_llama_train_reference.py), and the real SmolLM2 GGUF made
//! trainable (rotary layout converted) and saved in HF's layout, giving the same logits; LoRA
//! adapters against PEFT (tests/fixtures/make_lora_reference.py).
//!
//! Tolerances: logits 1e-5 + 1e-5·|x| elementwise (O(1) values, f32 on both sides); gradients
//! relative per tensor, ‖got − expected‖ ≤ 1e-4·‖expected‖, with no absolute floor.

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rustrag::generators::gguf::GgufFile;
use rustrag::generators::llama::{GgufWeights, Llama, LoraAdapter};
use rustrag::generators::{CausalLm, GenInput};
use rustrag::hub::Weights;
use rustrag::tokenize::ids_tensor;
use rustrag::train::optim::{AdamW, AdamWConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What both reference scripts record: prompts and continuations, transformers' logits of the
/// continuations, the loss and the gradient of every trainable tensor by name.
#[derive(serde::Deserialize)]
struct TeacherForced {
    prompts: Vec<Vec<u32>>,
    continuations: Vec<Vec<u32>>,
    logits: Vec<f32>,
    logits_shape: Vec<usize>,
    loss: f32,
    grads: HashMap<String, Vec<f32>>,
}

#[derive(serde::Deserialize)]
struct Reference {
    model: String,
    trainable_layers: usize,
    #[serde(flatten)]
    forced: TeacherForced,
    frozen: Vec<String>,
}

/// Right-padded generator input (`pad` 0) from rows of ids.
fn gen_input(rows: &[Vec<u32>]) -> Result<GenInput> {
    let l = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let pad = |r: &Vec<u32>, fill: u32, one: bool| -> Vec<u32> {
        let mut v: Vec<u32> = r.iter().map(|&x| if one { 1 } else { x }).collect();
        v.resize(l, fill);
        v
    };
    let ids: Vec<Vec<u32>> = rows.iter().map(|r| pad(r, 0, false)).collect();
    let mask: Vec<Vec<u32>> = rows.iter().map(|r| pad(r, 0, true)).collect();
    Ok(GenInput {
        input_ids: ids_tensor(&ids, &Device::Cpu)?,
        attention_mask: ids_tensor(&mask, &Device::Cpu)?,
    })
}

/// Minus the summed log-probs of `targets: [rows, T]` under `logits: [rows, T, V]`.
fn nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lp = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
    Ok(lp.gather(&targets.unsqueeze(2)?, 2)?.sum_all()?.neg()?)
}

fn close(what: &str, got: &[f32], want: &[f32]) -> Result<()> {
    ensure!(
        got.len() == want.len(),
        "{what}: {} values vs {}",
        got.len(),
        want.len()
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        ensure!(
            (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
            "{what}[{i}]: {g} vs {w}"
        );
    }
    Ok(())
}

fn rel_close(what: &str, got: &[f32], want: &[f32]) -> Result<()> {
    ensure!(
        got.len() == want.len(),
        "{what}: {} values vs {}",
        got.len(),
        want.len()
    );
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let diff = norm(&mut got.iter().zip(want).map(|(g, w)| (g - w) as f64));
    let reference = norm(&mut want.iter().map(|&w| w as f64));
    ensure!(
        diff <= 1e-4 * reference,
        "{what}: ‖got − expected‖ {diff:.3e} > 1e-4 · ‖expected‖ {reference:.3e}"
    );
    Ok(())
}

/// Teacher-forced logits of the reference's continuations after its prompts and their loss
/// (targets = continuation[1:] + eos), checked against the reference's; returns the loss and the
/// targets.
fn checked_loss(model: &Llama, r: &TeacherForced) -> Result<(Tensor, Tensor)> {
    let input = gen_input(&r.prompts)?;
    let cont = ids_tensor(&r.continuations, &Device::Cpu)?;
    let logits = CausalLm::forward(model, &input, &cont)?;
    ensure!(
        logits.dims() == r.logits_shape,
        "logits {:?}",
        logits.dims()
    );
    close("logits", &logits.flatten_all()?.to_vec1()?, &r.logits)?;
    let eos = model.config.eos_token_id.context("eos")?;
    let targets: Vec<Vec<u32>> = r
        .continuations
        .iter()
        .map(|c| c[1..].iter().copied().chain([eos]).collect())
        .collect();
    let targets = ids_tensor(&targets, &Device::Cpu)?;
    let loss = nll(&logits, &targets)?;
    close("loss", &[loss.to_scalar::<f32>()?], &[r.loss])?;
    Ok((loss, targets))
}

#[test]
fn gradients_of_the_top_layer_match_transformers() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/fixtures/llama_train_reference.json"))?;
    let r: Reference = serde_json::from_str(&text)?;
    let mut model = Llama::from_hf_dir(&root.join(&r.model), &Device::Cpu)?;
    model.make_trainable(r.trainable_layers)?;
    let (loss, _) = checked_loss(&model, &r.forced)?;
    let grads = loss.backward()?;
    let vars = model.vars();
    let mut names: Vec<&String> = vars.iter().map(|(n, _)| n).collect();
    let mut want: Vec<&String> = r.forced.grads.keys().collect();
    names.sort();
    want.sort();
    ensure!(names == want, "trainable {names:?} vs HF's {want:?}");
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .with_context(|| format!("{name}: no gradient"))?;
        rel_close(name, &g.flatten_all()?.to_vec1()?, &r.forced.grads[name])?;
    }
    // Frozen parameters: exactly HF's list, and no gradient reaches them.
    let state = model.state_dict()?;
    let mut frozen: Vec<&String> = state
        .keys()
        .filter(|k| !r.forced.grads.contains_key(*k))
        .collect();
    frozen.sort();
    let mut want_frozen: Vec<&String> = r.frozen.iter().collect();
    want_frozen.sort();
    ensure!(
        frozen == want_frozen,
        "frozen {frozen:?} vs {want_frozen:?}"
    );
    for name in frozen {
        ensure!(grads.get(&state[name]).is_none(), "{name} got a gradient");
    }
    Ok(())
}

fn gguf_path() -> PathBuf {
    let models = std::env::var("RUSTRAG_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    let p = models.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "SmolLM2 GGUF missing: {} (scripts/fetch-models.sh or set RUSTRAG_MODELS)",
        p.display()
    );
    p
}

/// SmolLM2's GGUF interleaves the rotary halves of q/k; training converts them to HF's layout and
/// switches the top blocks to differentiable ops: the logits must not change, and the saved HF
/// directory must load back to the same logits.
#[test]
fn smollm2_made_trainable_and_saved_keeps_its_logits() -> Result<()> {
    let g = GgufFile::open(&gguf_path())?;
    let mut model = Llama::from_gguf_with(&g, &Device::Cpu, GgufWeights::F32)?;
    let prompts = vec![vec![1, 504, 3458, 282, 4649, 314], vec![1, 6121, 314]];
    let input = gen_input(&prompts)?;
    let cont = ids_tensor(&[vec![1, 422, 1345], vec![1, 30, 2017]], &Device::Cpu)?;
    let before = CausalLm::forward(&model, &input, &cont)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    model.make_trainable(2)?;
    ensure!(
        model.vars().len() == 2 * 9 + 1,
        "{} vars",
        model.vars().len()
    );
    let after = CausalLm::forward(&model, &input, &cont)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    // Same weights, other op order (fused vs spelled-out rotary/softmax/norm): f32 noise only.
    ensure!(
        max_diff(&before, &after) < 1e-3,
        "trainable: max |Δlogit| {}",
        max_diff(&before, &after)
    );
    let dir = tempfile::tempdir()?;
    model.save_hf(dir.path())?;
    let reloaded = Llama::from_hf_dir(dir.path(), &Device::Cpu)?;
    let again = CausalLm::forward(&reloaded, &input, &cont)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    ensure!(
        max_diff(&before, &again) < 1e-3,
        "reloaded: max |Δlogit| {}",
        max_diff(&before, &again)
    );
    Ok(())
}

#[derive(serde::Deserialize)]
struct LoraReference {
    model: String,
    adapter: String,
    #[serde(flatten)]
    forced: TeacherForced,
    lr: f64,
    weight_decay: f64,
    loss_after_step: f32,
}

/// LoRA against PEFT (tests/fixtures/make_lora_reference.py): PEFT's adapter directory loads, the
/// logits, loss and every adapter's gradient equal PEFT's (tolerances as above), one AdamW step
/// gives PEFT + torch.optim.AdamW's next loss (1e-4 relative: two f32 forwards and an update
/// apart), merging keeps the logits, and the adapters saved by rustrag load back unchanged.
#[test]
fn lora_adapters_match_peft() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/fixtures/lora_reference.json"))?;
    let r: LoraReference = serde_json::from_str(&text)?;
    let adapter = LoraAdapter::read(&root.join(&r.adapter))?;
    ensure!(
        adapter.base.canonicalize()? == root.join(&r.model).canonicalize()?,
        "adapter base {}",
        adapter.base.display()
    );
    let load = || -> Result<Llama> {
        let mut model = Llama::from_hf_dir(&adapter.base, &Device::Cpu)?;
        let w = Weights::from_file(&adapter.weights, DType::F32, &Device::Cpu, false)?;
        model.add_lora(&adapter.config, Some(&w))?;
        Ok(model)
    };
    let model = load()?;
    let input = gen_input(&r.forced.prompts)?;
    let cont = ids_tensor(&r.forced.continuations, &Device::Cpu)?;
    let (loss, targets) = checked_loss(&model, &r.forced)?;
    let vars = model.vars();
    let mut names: Vec<&String> = vars.iter().map(|(n, _)| n).collect();
    let mut want: Vec<&String> = r.forced.grads.keys().collect();
    names.sort();
    want.sort();
    ensure!(names == want, "adapters {names:?} vs PEFT's {want:?}");
    let grads = loss.backward()?;
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .with_context(|| format!("{name}: no gradient"))?;
        rel_close(name, &g.flatten_all()?.to_vec1()?, &r.forced.grads[name])?;
    }
    // Saved before the update: rustrag's own adapter directory reloads to the same logits.
    let dir = tempfile::tempdir()?;
    model.save_lora(dir.path(), &adapter.base)?;
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: r.lr,
            weight_decay: r.weight_decay,
            ..Default::default()
        },
    )?;
    let g: Vec<Option<Tensor>> = vars.iter().map(|(_, v)| grads.get(v).cloned()).collect();
    opt.step(&g, r.lr)?;
    let after = nll(&CausalLm::forward(&model, &input, &cont)?, &targets)?.to_scalar::<f32>()?;
    ensure!(
        (after - r.loss_after_step).abs() <= 1e-4 * r.loss_after_step.abs(),
        "loss after one AdamW step {after} vs PEFT + torch {}",
        r.loss_after_step
    );

    let saved = LoraAdapter::read(dir.path())?;
    ensure!(saved.config.rank == adapter.config.rank && saved.config.layers == Some(1));
    let mut reloaded = Llama::from_hf_dir(&saved.base, &Device::Cpu)?;
    let w = Weights::from_file(&saved.weights, DType::F32, &Device::Cpu, false)?;
    reloaded.add_lora(&saved.config, Some(&w))?;
    let again = CausalLm::forward(&reloaded, &input, &cont)?;
    close(
        "reloaded logits",
        &again.flatten_all()?.to_vec1()?,
        &r.forced.logits,
    )?;
    reloaded.merge_lora()?;
    ensure!(
        reloaded.vars().is_empty(),
        "merged model keeps trainable adapters"
    );
    let merged = CausalLm::forward(&reloaded, &input, &cont)?;
    close(
        "merged logits",
        &merged.flatten_all()?.to_vec1()?,
        &r.forced.logits,
    )?;
    Ok(())
}

/// Adapter settings that change the math are refused, naming the file and the key.
#[test]
fn unsupported_peft_variants_are_refused() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("tests/fixtures/lora/adapter_config.json"),
    )?)?;
    for (key, value) in [
        ("use_dora", serde_json::json!(true)),
        ("rank_pattern", serde_json::json!({"q_proj": 8})),
        ("peft_type", serde_json::json!("IA3")),
        ("layers_to_transform", serde_json::json!([0, 2])),
    ] {
        let dir = tempfile::tempdir()?;
        let mut c = config.clone();
        c[key] = value;
        std::fs::write(dir.path().join("adapter_config.json"), c.to_string())?;
        let err = LoraAdapter::read(dir.path())
            .err()
            .context(key)?
            .to_string();
        ensure!(
            err.contains("adapter_config.json") && err.contains(key),
            "{key}: {err}"
        );
    }
    Ok(())
}
