//! Phi-3 on the Llama blocks: llama.cpp's converter stores q, k and v as one `attn_qkv` tensor
//! (rows: q, then k, then v) and gate and up as one `ffn_up` tensor of `2 * ffn` rows (gate first:
//! llama.cpp's SWIGLU takes `silu(first half) * second half`, as HF's `Phi3MLP` chunks it). Their
//! rows are split here into the Llama projections; everything else is Llama's with NEOX rotary
//! (halves) and no bias. llama.cpp disables Phi's sliding window (`phi3.attention.sliding_window`
//! is read and ignored), and so do we, to compute what it computes. LongRoPE (Phi-3-*-128k, Phi-3.5)
//! is the rotary frequency factors of [`super::config`].

use crate::generators::gguf::GgufFile;
use anyhow::{bail, Context, Result};
use candle_core::quantized::{QStorage, QTensor};
use candle_core::Device;

/// Tensor `name` of shape `[sum(rows), cols]` split into consecutive row blocks `[rows_i, cols]`,
/// each in the stored type (rows of a GGUF tensor are whole quantisation blocks, contiguous).
pub(super) fn split_rows(
    g: &GgufFile,
    name: &str,
    rows: &[usize],
    cols: usize,
    device: &Device,
) -> Result<Vec<QTensor>> {
    let t = g.tensor(name, &[rows.iter().sum(), cols], device)?;
    let dtype = t.dtype();
    let ctx = || format!("{}: splitting tensor `{name}`", g.path.display());
    if !cols.is_multiple_of(dtype.block_size()) {
        bail!(
            "{}: tensor `{name}`: rows of {cols} values are not whole {dtype:?} blocks",
            g.path.display()
        );
    }
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = t.data().with_context(ctx)?;
    let mut start = 0;
    rows.iter()
        .map(|&n| {
            let bytes = &data[start * row_bytes..(start + n) * row_bytes];
            start += n;
            let storage = QStorage::from_data(std::borrow::Cow::Borrowed(bytes), device, dtype)
                .with_context(ctx)?;
            QTensor::new(storage, (n, cols)).with_context(ctx)
        })
        .collect()
}
