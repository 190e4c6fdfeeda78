//! Finding and loading models the way Hugging Face stores them.
//!
//! A model is named either by a local directory (as `save_pretrained` writes it) or by a hub id
//! (`org/name`) that must already be in the local HF hub cache (`models--org--name/snapshots/<rev>/`).
//! Nothing here touches the network.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Directories searched for a hub id, in order: `$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`.
pub fn hub_cache_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        dirs.push(PathBuf::from(p));
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        dirs.push(PathBuf::from(p).join("hub"));
    }
    if let Ok(p) = std::env::var("XDG_CACHE_HOME") {
        dirs.push(PathBuf::from(p).join("huggingface").join("hub"));
    }
    if let Ok(home) = std::env::var("HOME") {
        dirs.push(
            PathBuf::from(home)
                .join(".cache")
                .join("huggingface")
                .join("hub"),
        );
    }
    dirs.dedup();
    dirs
}

/// Resolve a model directory from a local path or a cached hub id (`org/name`, optional `@revision`).
///
/// Errors name the id and every path that was searched.
pub fn resolve_model_dir(id_or_path: &str) -> Result<PathBuf> {
    let p = Path::new(id_or_path);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let (id, revision) = match id_or_path.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (id_or_path, "main"),
    };
    let mut searched = vec![p.display().to_string()];
    if id.contains('/') && !id.starts_with('/') && !id.starts_with('.') {
        let repo = format!("models--{}", id.replace('/', "--"));
        for cache in hub_cache_dirs() {
            let root = cache.join(&repo);
            searched.push(root.display().to_string());
            if let Some(dir) = snapshot_dir(&root, revision) {
                return Ok(dir);
            }
        }
    }
    bail!(
        "model `{id_or_path}` not found (no network access is used); searched: {}",
        searched.join(", ")
    )
}

/// `root/snapshots/<hash>` for a revision name (via `refs/<revision>`) or a commit hash;
/// falls back to the only snapshot present.
fn snapshot_dir(root: &Path, revision: &str) -> Option<PathBuf> {
    let snapshots = root.join("snapshots");
    if let Ok(hash) = std::fs::read_to_string(root.join("refs").join(revision)) {
        let dir = snapshots.join(hash.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let direct = snapshots.join(revision);
    if direct.is_dir() {
        return Some(direct);
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    (entries.len() == 1).then(|| entries[0].clone())
}

/// Read and parse a JSON file, with the path in every error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// All weight tensors of a model, by their HF names, with the file each came from.
///
/// When `trainable`, every tensor is a [`Var`] so that gradients can be taken and applied.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<WeightsInner>,
}

struct WeightsInner {
    tensors: HashMap<String, (Tensor, PathBuf)>,
    vars: HashMap<String, Var>,
    origin: PathBuf,
    /// Integer tensors that were skipped (buffers such as position_ids), kept to name their dtype when a
    /// model asks for one of them as a parameter.
    non_float: HashMap<String, (DType, PathBuf)>,
}

impl Weights {
    /// Load `model.safetensors`, sharded safetensors (`model.safetensors.index.json`),
    /// `pytorch_model.bin` or its sharded index from `dir`; floats are converted to `dtype`.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device, trainable: bool) -> Result<Self> {
        let files = weight_files(dir)?;
        let (mut tensors, mut non_float) = (HashMap::new(), HashMap::new());
        for file in &files {
            for (name, t) in read_weight_file(file, device)? {
                if !t.dtype().is_float() {
                    // Integer buffers (e.g. BERT position_ids) are not parameters.
                    non_float.insert(name, (t.dtype(), file.clone()));
                    continue;
                }
                let t = t.to_dtype(dtype)?;
                tensors.insert(name, (t, file.clone()));
            }
        }
        Self::build(tensors, dir.to_path_buf(), trainable, non_float)
    }

    /// Load one weight file (`.safetensors`, `.bin`/`.pt`, or `.gguf` is not handled here).
    pub fn from_file(file: &Path, dtype: DType, device: &Device, trainable: bool) -> Result<Self> {
        let (mut tensors, mut non_float) = (HashMap::new(), HashMap::new());
        for (name, t) in read_weight_file(file, device)? {
            if t.dtype().is_float() {
                tensors.insert(name, (t.to_dtype(dtype)?, file.to_path_buf()));
            } else {
                non_float.insert(name, (t.dtype(), file.to_path_buf()));
            }
        }
        Self::build(tensors, file.to_path_buf(), trainable, non_float)
    }

    /// Wrap tensors that are already in memory (tests, conversions).
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        origin: &str,
        trainable: bool,
    ) -> Result<Self> {
        let origin = PathBuf::from(origin);
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| (k, (v, origin.clone())))
            .collect();
        Self::build(tensors, origin, trainable, HashMap::new())
    }

    fn build(
        mut tensors: HashMap<String, (Tensor, PathBuf)>,
        origin: PathBuf,
        trainable: bool,
        non_float: HashMap<String, (DType, PathBuf)>,
    ) -> Result<Self> {
        let mut vars = HashMap::new();
        if trainable {
            for (name, (t, _)) in tensors.iter_mut() {
                let var = Var::from_tensor(t)?;
                *t = var.as_tensor().clone();
                vars.insert(name.clone(), var);
            }
        }
        Ok(Self {
            inner: Arc::new(WeightsInner {
                tensors,
                vars,
                origin,
                non_float,
            }),
        })
    }

    /// Error text for a tensor that is not a loaded float parameter: missing, or stored with an integer dtype.
    fn missing(&self, name: &str) -> String {
        match self.inner.non_float.get(name) {
            Some((dtype, file)) => format!(
                "{}: tensor `{name}` has dtype {dtype:?}, a floating-point parameter is expected",
                file.display()
            ),
            None => format!("{}: missing tensor `{name}`", self.inner.origin.display()),
        }
    }

    /// Where the weights were read from (directory or file).
    pub fn origin(&self) -> &Path {
        &self.inner.origin
    }

    pub fn contains(&self, name: &str) -> bool {
        self.inner.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.inner.tensors.keys().map(|s| s.as_str())
    }

    /// The tensor called `name`, or an error naming the file and the tensor.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        match self.inner.tensors.get(name) {
            Some((t, _)) => Ok(t.clone()),
            None => bail!("{}", self.missing(name)),
        }
    }

    /// Trainable variables by name (empty unless loaded with `trainable`).
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut v: Vec<_> = self
            .inner
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// A candle `VarBuilder` over these weights whose errors name the file, the tensor and the shapes.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }
}

impl candle_nn::var_builder::SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            let file = &self.inner.tensors[name].1;
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` has shape {:?}, the model config expects {:?}",
                file.display(),
                t.dims(),
                s.dims()
            )));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.inner.tensors.get(name) {
            Some((t, _)) => t.to_dtype(dtype)?.to_device(dev),
            None => Err(candle_core::Error::Msg(self.missing(name))),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.tensors.contains_key(name)
    }
}

/// The weight files of a HF model directory, in load order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for index in [
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    ] {
        let index_path = dir.join(index);
        if index_path.is_file() {
            let v: serde_json::Value = read_json(&index_path)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: no `weight_map` object", index_path.display()))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            return Ok(files.into_iter().map(|f| dir.join(f)).collect());
        }
    }
    for single in ["model.safetensors", "pytorch_model.bin"] {
        let p = dir.join(single);
        if p.is_file() {
            return Ok(vec![p]);
        }
    }
    bail!(
        "{}: no weights (looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)",
        dir.display()
    )
}

/// Run a dependency's parser of an untrusted `file` (candle's safetensors, pickle and GGUF readers),
/// turning a panic inside it into an error naming the file: a corrupt file is an error, never a
/// crash. (An allocation failure still aborts; callers bound sizes before allocating.)
pub fn parse_guarded<T>(file: &Path, parse: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            bail!(
                "{}: the reader failed on this file ({msg}): corrupt or not what its name says",
                file.display()
            )
        }
    }
}

fn read_weight_file(file: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    parse_guarded(file, || read_weight_file_unguarded(file, device))
}

fn read_weight_file_unguarded(file: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    let loaded = match ext {
        "safetensors" => {
            candle_core::safetensors::load(file, device).map(|m| m.into_iter().collect::<Vec<_>>())
        }
        "bin" | "pt" | "pth" => candle_core::pickle::read_all(file).and_then(|v| {
            v.into_iter()
                .map(|(k, t)| t.to_device(device).map(|t| (k, t)))
                .collect()
        }),
        _ => bail!("{}: unknown weight file type", file.display()),
    };
    loaded.with_context(|| {
        format!(
            "{}: cannot read weights (corrupt or truncated file?)",
            file.display()
        )
    })
}
