//! HF RAG checkpoints as `save_pretrained` writes them: `config.json` (RagConfig with sub-configs),
//! optional `generation_config.json`, `model.safetensors` (`rag.question_encoder.*`,
//! `rag.generator.*`), `question_encoder_tokenizer/`, `generator_tokenizer/`.

use crate::generators::auto::load_seq2seq;
use crate::generators::Generator;
use crate::rag::config::{GenerationSettings, RagConfig, RagMode};
use crate::rag::context::{ContextFormat, InputFormat};
use crate::rag::model::{QuestionEncoder, RagModel};
use crate::tokenize::load_tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Options for [`load_rag`].
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Load every parameter as a trainable `Var`.
    pub trainable: bool,
    /// Head to use when `architectures` names none.
    pub mode: Option<RagMode>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            trainable: false,
            mode: None,
        }
    }
}

/// Load an HF RAG checkpoint directory (or cached hub id). The question encoder is loaded when the
/// checkpoint has one (`rag.question_encoder.*` weights).
pub fn load_rag(dir_or_id: &str, opts: &LoadOptions) -> Result<RagModel> {
    let dir = crate::hub::resolve_model_dir(dir_or_id)?;
    let config_path = dir.join("config.json");
    let config = RagConfig::from_file(&config_path)?;
    let mode = opts.mode.or_else(|| config.mode()).with_context(|| {
        format!(
            "{}: `architectures` names no RAG head; choose --mode token|sequence",
            config_path.display()
        )
    })?;
    let generator = load_seq2seq(
        &dir.to_string_lossy(),
        opts.dtype,
        &opts.device,
        opts.trainable,
    )
    .with_context(|| format!("loading the generator of {}", dir.display()))?;
    let generator_tokenizer = load_tokenizer(&dir.join("generator_tokenizer"))?;
    let vocab = generator.special_ids().vocab_size;
    generator_tokenizer.check_vocab(vocab, &config_path)?;
    let qdir = dir.join("question_encoder_tokenizer");
    let question_tokenizer = if qdir.is_dir() {
        Some(load_tokenizer(&qdir)?)
    } else {
        None
    };
    let question_encoder = load_question_encoder(&dir, &config, opts)?;
    let gen_cfg = dir.join("generation_config.json");
    let from_generator = GenerationSettings::from_value(&config.generator);
    let generation = if gen_cfg.is_file() {
        GenerationSettings::from_file(&gen_cfg)?.or(&from_generator)
    } else {
        from_generator
    };
    let format = ContextFormat {
        prefix: generator
            .config_prefix()
            .map(String::from)
            .or_else(|| config.generator_prefix()),
        title_sep: config.title_sep.clone(),
        doc_sep: config.doc_sep.clone(),
        max_combined_length: config.max_combined_length,
    };
    Ok(RagModel {
        config,
        mode,
        question_encoder,
        question_tokenizer,
        generator: Generator::Seq2Seq(generator),
        generator_tokenizer,
        generation,
        format: InputFormat::Seq2Seq(format),
        prior_temperature: 1.0,
        device: opts.device.clone(),
        source: Some(dir),
    })
}

/// An HF RAG checkpoint together with its knowledge base directory as the parity fixtures and
/// `use_own_knowledge_dataset.py` lay it out (`passages.jsonl` + `embeddings.safetensors`).
pub fn load_rag_with_kb(
    dir_or_id: &str,
    kb_dir: &std::path::Path,
    mode: Option<RagMode>,
) -> Result<(RagModel, crate::rag::InMemoryIndex)> {
    let model = load_rag(
        dir_or_id,
        &LoadOptions {
            mode,
            ..Default::default()
        },
    )?;
    let index = crate::rag::InMemoryIndex::load(
        &kb_dir.join("passages.jsonl"),
        &kb_dir.join("embeddings.safetensors"),
    )?;
    Ok((model, index))
}

/// The DPR question encoder nested in a RAG checkpoint (`rag.question_encoder.question_encoder.bert_model.*`).
fn load_question_encoder(
    dir: &Path,
    config: &RagConfig,
    opts: &LoadOptions,
) -> Result<Option<Box<dyn QuestionEncoder>>> {
    let model_type = config
        .question_encoder
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if model_type != "dpr" {
        bail!(
            "{}: question encoder `model_type` is `{model_type}`; only DPR question encoders are supported",
            dir.join("config.json").display()
        );
    }
    let enc_opts = crate::encoders::LoadOptions {
        trainable: opts.trainable,
        device: opts.device.clone(),
        ..Default::default()
    };
    let enc = crate::encoders::dpr::DprEncoder::load_from_rag(dir, &enc_opts)
        .with_context(|| format!("loading the question encoder of {}", dir.display()))?;
    Ok(Some(Box::new(enc)))
}

impl RagModel {
    /// Write the checkpoint in HF's `save_pretrained` layout to `out` (config.json,
    /// generation_config.json, model.safetensors, both tokenizer dirs). Weights come from the trainable
    /// variables when the model was loaded trainable (so training is saved), else from the source files.
    pub fn save_pretrained(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let src = self
            .source
            .as_ref()
            .context("model was not loaded from a directory")?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let weights = crate::hub::Weights::from_dir(src, DType::F32, &Device::Cpu, false)?;
        for name in weights.names() {
            tensors.insert(name.to_string(), weights.get(name)?);
        }
        let mut vars = self.generator.vars();
        if let Some(q) = &self.question_encoder {
            vars.extend(q.vars());
        }
        for (name, var) in vars {
            if !tensors.contains_key(&name) {
                bail!("trainable parameter `{name}` is not in {}", src.display());
            }
            tensors.insert(
                name,
                var.as_tensor()
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?,
            );
        }
        write_atomic(&out.join("model.safetensors"), |tmp| {
            Ok(candle_core::safetensors::save(&tensors, tmp)?)
        })?;
        let config = serde_json::to_string_pretty(&self.config.to_value()?)?;
        write_atomic(&out.join("config.json"), |tmp| {
            Ok(std::fs::write(tmp, config.as_bytes())?)
        })?;
        let generation_config = src.join("generation_config.json");
        if generation_config.is_file() {
            write_atomic(&out.join("generation_config.json"), |tmp| {
                Ok(std::fs::copy(&generation_config, tmp).map(|_| ())?)
            })?;
        }
        for sub in ["question_encoder_tokenizer", "generator_tokenizer"] {
            let from = src.join(sub);
            if !from.is_dir() {
                continue;
            }
            let to = out.join(sub);
            std::fs::create_dir_all(&to)?;
            for e in std::fs::read_dir(&from)? {
                let e = e?;
                if e.file_type()?.is_file() {
                    let dst = to.join(e.file_name());
                    write_atomic(&dst, |tmp| Ok(std::fs::copy(e.path(), tmp).map(|_| ())?))?;
                }
            }
        }
        Ok(())
    }
}

/// Write through a temp file in the same directory, fsync, rename.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(&dir)?;
    let tmp_path = tmp.path().to_path_buf();
    write(&tmp_path).with_context(|| format!("writing {}", path.display()))?;
    std::fs::File::open(&tmp_path)?.sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}
