//! Native CPU matmul for GGUF-quantized weights, as llama.cpp computes it: the activations are
//! quantized to the type the weight's dot product takes (`Q8_1` per 32 values for Q4_0/Q4_1/Q5_0/
//! Q5_1/Q8_0: scale `d`, and `s = d * sum(q)` so that an offset `m` costs one multiply per block;
//! `Q8_K` per 256 values for the k-quants Q4_K/Q5_K/Q6_K; f16/bf16 for F16/BF16 weights, f32 for
//! F32), and each weight row is dotted by the kernels in [`crate::kernels::q8`] /
//! [`crate::kernels::kquant`] (AVX-512 or AVX2 where the CPU has it, else their scalar fallback).
//!
//! Why not candle's `QMatMul`: candle 0.11's CPU kernels for Q4_1/Q5_x are scalar. Output rows are
//! split over the rayon pool; several activation rows (prefill) reuse each weight row while it is
//! in L1. A matrix may stack row ranges of different types (q/k/v of a Q4_K_M file are Q4_K, Q4_K
//! and Q6_K) so that projections reading the same input still run as one matmul.

use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::kernels::dot::{dot_bf16, dot_f16, dot_unrolled};
use crate::kernels::kquant::{self, quantize_q8_k, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, QK_K};
use crate::kernels::q8::{self, BlockQ4_0, BlockQ5_0, BlockQ5_1, LegacyBlock, Q8Row, Q8Rows};
pub use crate::kernels::q8::{quantize_q8_1, BlockQ8_1, QK};

/// Bytes of quantized activations per tile of a quantized matmul: about an L1 data cache (Q8_1 and
/// Q8_K take ~1.13 bytes per value).
const ACT_TILE_BYTES: usize = 32 * 1024;

/// Q4_1 rows as stored in GGUF blocks (`x = d * q + m`, `q` in 0..16; byte `j` of a block holds
/// element `j` in its low nibble and `j + 16` in its high nibble), split into arrays of the block
/// fields (struct of arrays) so that the kernel converts 8 `d`/`m` at a time. Index = row * blocks
/// per row + block.
#[derive(Clone, Debug, Default)]
struct Q4_1Blocks {
    d: Vec<u16>,
    m: Vec<u16>,
    qs: Vec<[u8; QK / 2]>,
}

/// Q8_0 rows (`x = d * q`), struct of arrays as [`Q4_1Blocks`].
#[derive(Clone, Debug, Default)]
struct Q8_0Blocks {
    d: Vec<u16>,
    qs: Vec<[i8; QK]>,
}

/// The weights of a row range, in one GGUF type. Index = row * blocks per row + block.
#[derive(Clone, Debug)]
enum Blocks {
    Q4_1(Q4_1Blocks),
    Q8_0(Q8_0Blocks),
    Q4_0(Vec<BlockQ4_0>),
    Q5_0(Vec<BlockQ5_0>),
    Q5_1(Vec<BlockQ5_1>),
    Q4K(Vec<BlockQ4K>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<BlockQ6K>),
    /// f16 weights: activations rounded to f16 (as ggml's `vec_dot_f16`), f32 sums.
    F16(Vec<f16>),
    /// bf16 weights (bits): activations rounded to bf16, f32 sums.
    BF16(Vec<u16>),
    /// Unquantized weights: plain f32 dots, activations not quantized.
    F32(Vec<f32>),
}

/// The activation form a weight type's dot product takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActKind {
    Q8_1,
    Q8K,
    F32,
    F16,
    BF16,
}

impl Blocks {
    fn dtype(&self) -> GgmlDType {
        match self {
            Blocks::Q4_1(_) => GgmlDType::Q4_1,
            Blocks::Q8_0(_) => GgmlDType::Q8_0,
            Blocks::Q4_0(_) => GgmlDType::Q4_0,
            Blocks::Q5_0(_) => GgmlDType::Q5_0,
            Blocks::Q5_1(_) => GgmlDType::Q5_1,
            Blocks::Q4K(_) => GgmlDType::Q4K,
            Blocks::Q5K(_) => GgmlDType::Q5K,
            Blocks::Q6K(_) => GgmlDType::Q6K,
            Blocks::F16(_) => GgmlDType::F16,
            Blocks::BF16(_) => GgmlDType::BF16,
            Blocks::F32(_) => GgmlDType::F32,
        }
    }

    fn act(&self) -> ActKind {
        match self {
            Blocks::Q4K(_) | Blocks::Q5K(_) | Blocks::Q6K(_) => ActKind::Q8K,
            Blocks::F32(_) => ActKind::F32,
            Blocks::F16(_) => ActKind::F16,
            Blocks::BF16(_) => ActKind::BF16,
            _ => ActKind::Q8_1,
        }
    }

    /// Append `other`'s rows; false when the types differ.
    fn extend(&mut self, other: &Blocks) -> bool {
        match (self, other) {
            (Blocks::Q4_1(a), Blocks::Q4_1(b)) => {
                a.d.extend_from_slice(&b.d);
                a.m.extend_from_slice(&b.m);
                a.qs.extend_from_slice(&b.qs);
            }
            (Blocks::Q8_0(a), Blocks::Q8_0(b)) => {
                a.d.extend_from_slice(&b.d);
                a.qs.extend_from_slice(&b.qs);
            }
            (Blocks::Q4_0(a), Blocks::Q4_0(b)) => a.extend_from_slice(b),
            (Blocks::Q5_0(a), Blocks::Q5_0(b)) => a.extend_from_slice(b),
            (Blocks::Q5_1(a), Blocks::Q5_1(b)) => a.extend_from_slice(b),
            (Blocks::Q4K(a), Blocks::Q4K(b)) => a.extend_from_slice(b),
            (Blocks::Q5K(a), Blocks::Q5K(b)) => a.extend_from_slice(b),
            (Blocks::Q6K(a), Blocks::Q6K(b)) => a.extend_from_slice(b),
            (Blocks::F16(a), Blocks::F16(b)) => a.extend_from_slice(b),
            (Blocks::BF16(a), Blocks::BF16(b)) => a.extend_from_slice(b),
            (Blocks::F32(a), Blocks::F32(b)) => a.extend_from_slice(b),
            _ => return false,
        }
        true
    }
}

/// Rows `start..start + rows` of a [`QMatrix`], in one type.
#[derive(Clone, Debug)]
struct Segment {
    start: usize,
    rows: usize,
    blocks: Blocks,
}

/// A quantized weight matrix `[rows, cols]` (row-major blocks; `cols % 32 == 0`, `% 256` for
/// k-quants), i.e. a linear layer `y = x W^T` with `x: [m, cols]`, `y: [m, rows]`.
#[derive(Clone, Debug)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    /// Row ranges in order, each of one type (one segment unless rows of different types were
    /// stacked by [`QMatrix::concat_rows`]).
    segs: Vec<Segment>,
}

/// The activation rows `[m, cols]` in every form the segments of a matrix take.
struct Acts<'a> {
    cols: usize,
    q8_1: Option<Q8Rows>,
    q8k: Option<Vec<BlockQ8K>>,
    f32: &'a [f32],
    /// Rounded to f16 / bf16 (as f32), for F16 / BF16 weights.
    rounded: Option<Vec<f32>>,
}

impl<'a> Acts<'a> {
    fn new(x: &'a [f32], cols: usize, kinds: &[ActKind]) -> Self {
        let has = |k| kinds.contains(&k);
        let rounded = if has(ActKind::F16) {
            Some(x.iter().map(|&v| f16::from_f32(v).to_f32()).collect())
        } else if has(ActKind::BF16) {
            Some(
                x.iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect(),
            )
        } else {
            None
        };
        Self {
            cols,
            q8_1: has(ActKind::Q8_1).then(|| Q8Rows::new(&quantize_q8_1(x, cols))),
            q8k: has(ActKind::Q8K).then(|| quantize_q8_k(x)),
            f32: x,
            rounded,
        }
    }

    fn q8_1(&self, i: usize) -> Q8Row<'_> {
        self.q8_1
            .as_ref()
            .expect("Q8_1 activations prepared")
            .row(i, self.cols / QK)
    }

    fn q8k(&self, i: usize) -> &[BlockQ8K] {
        let nb = self.cols / QK_K;
        &self.q8k.as_ref().expect("Q8_K activations prepared")[i * nb..(i + 1) * nb]
    }

    fn rounded(&self, i: usize) -> &[f32] {
        &self.rounded.as_ref().expect("rounded activations prepared")
            [i * self.cols..(i + 1) * self.cols]
    }
}

fn f16_bits(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

/// Whether the AVX2 kernels can run on this CPU (avx2 + fma + f16c; false when
/// `RUSTRAG_FORCE_SCALAR` is set): see [`crate::kernels::cpu`].
pub fn simd_available() -> bool {
    crate::kernels::cpu().avx2_fma_f16c()
}

/// The GGUF types [`QMatrix`] takes, for error messages.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K";

/// Parse `data` into blocks of `bytes` bytes each with `parse`, checking the byte count.
fn parse_blocks<B>(
    data: &[u8],
    n_blocks: usize,
    bytes: usize,
    what: &str,
    name: &str,
    parse: impl Fn(&[u8]) -> B,
) -> Result<Vec<B>> {
    if Some(data.len()) != n_blocks.checked_mul(bytes) {
        bail!(
            "tensor `{name}`: {} bytes of {what} data for {n_blocks} blocks of {bytes} bytes",
            data.len()
        );
    }
    Ok(data.chunks_exact(bytes).map(parse).collect())
}

impl QMatrix {
    /// Whether [`QMatrix::from_qtensor`] takes tensors of this type.
    pub fn supports(dtype: GgmlDType) -> bool {
        use GgmlDType as T;
        matches!(
            dtype,
            T::Q4_0
                | T::Q4_1
                | T::Q5_0
                | T::Q5_1
                | T::Q8_0
                | T::Q4K
                | T::Q5K
                | T::Q6K
                | T::F16
                | T::BF16
                | T::F32
        )
    }

    /// Copy a 2-D `QTensor` `[rows, cols]` of a [`SUPPORTED_TYPES`] type (`name` is only used in
    /// errors).
    pub fn from_qtensor(t: &QTensor, name: &str) -> Result<Self> {
        use GgmlDType as T;
        let (rows, cols) = t
            .shape()
            .dims2()
            .with_context(|| format!("tensor `{name}`: expected a matrix"))?;
        let dtype = t.dtype();
        let block = match dtype {
            T::F32 | T::F16 | T::BF16 => 1,
            T::Q4K | T::Q5K | T::Q6K => QK_K,
            _ => QK,
        };
        if cols % block != 0 {
            bail!("tensor `{name}`: {cols} columns is not a multiple of {block} ({dtype:?})");
        }
        let data = t
            .data()
            .with_context(|| format!("tensor `{name}`: reading quantized data"))?;
        let n = rows
            .checked_mul(cols)
            .with_context(|| format!("tensor `{name}`: shape [{rows}, {cols}] overflows"))?;
        let nb = n / block;
        let what = format!("{dtype:?}");
        let blocks = match dtype {
            T::Q4_1 => {
                const SZ: usize = 4 + QK / 2;
                let v = parse_blocks(&data, nb, SZ, &what, name, |c| {
                    (
                        f16_bits(c, 0),
                        f16_bits(c, 2),
                        c[4..SZ].try_into().expect("16"),
                    )
                })?;
                let mut b = Q4_1Blocks::default();
                for (d, m, qs) in v {
                    b.d.push(d);
                    b.m.push(m);
                    b.qs.push(qs);
                }
                Blocks::Q4_1(b)
            }
            T::Q8_0 => {
                let v = parse_blocks(&data, nb, 2 + QK, &what, name, |c| {
                    (
                        f16_bits(c, 0),
                        std::array::from_fn::<i8, QK, _>(|j| c[2 + j] as i8),
                    )
                })?;
                let (d, qs) = v.into_iter().unzip();
                Blocks::Q8_0(Q8_0Blocks { d, qs })
            }
            T::Q4_0 => Blocks::Q4_0(parse_blocks(
                &data,
                nb,
                BlockQ4_0::BYTES,
                &what,
                name,
                BlockQ4_0::from_bytes,
            )?),
            T::Q5_0 => Blocks::Q5_0(parse_blocks(
                &data,
                nb,
                BlockQ5_0::BYTES,
                &what,
                name,
                BlockQ5_0::from_bytes,
            )?),
            T::Q5_1 => Blocks::Q5_1(parse_blocks(
                &data,
                nb,
                BlockQ5_1::BYTES,
                &what,
                name,
                BlockQ5_1::from_bytes,
            )?),
            T::Q4K => Blocks::Q4K(parse_blocks(
                &data,
                nb,
                BlockQ4K::BYTES,
                &what,
                name,
                BlockQ4K::from_bytes,
            )?),
            T::Q5K => Blocks::Q5K(parse_blocks(
                &data,
                nb,
                BlockQ5K::BYTES,
                &what,
                name,
                BlockQ5K::from_bytes,
            )?),
            T::Q6K => Blocks::Q6K(parse_blocks(
                &data,
                nb,
                BlockQ6K::BYTES,
                &what,
                name,
                BlockQ6K::from_bytes,
            )?),
            T::F16 => Blocks::F16(parse_blocks(&data, nb, 2, &what, name, |c| {
                f16::from_bits(f16_bits(c, 0))
            })?),
            T::BF16 => Blocks::BF16(parse_blocks(&data, nb, 2, &what, name, |c| f16_bits(c, 0))?),
            T::F32 => Blocks::F32(parse_blocks(&data, nb, 4, &what, name, |b| {
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            })?),
            other => {
                bail!("tensor `{name}`: no native kernel for {other:?} (supported: {SUPPORTED_TYPES})")
            }
        };
        Ok(Self {
            rows,
            cols,
            segs: vec![Segment {
                start: 0,
                rows,
                blocks,
            }],
        })
    }

    /// Stack matrices with the same column count: `[sum rows, cols]` (fuses projections that
    /// read the same input, e.g. q/k/v). Parts of one type are merged; a change of type starts a
    /// new row range.
    pub fn concat_rows(parts: &[&QMatrix]) -> Result<Self> {
        let first = parts.first().context("concat_rows: no matrices")?;
        let cols = first.cols;
        let mut rows = 0;
        let mut segs: Vec<Segment> = Vec::new();
        for p in parts {
            if p.cols != cols {
                bail!("concat_rows: {} columns vs {cols}", p.cols);
            }
            for s in &p.segs {
                let merged = match segs.last_mut() {
                    Some(last) => {
                        let ok = last.blocks.extend(&s.blocks);
                        if ok {
                            last.rows += s.rows;
                        }
                        ok
                    }
                    None => false,
                };
                if !merged {
                    segs.push(Segment {
                        start: rows,
                        rows: s.rows,
                        blocks: s.blocks.clone(),
                    });
                }
                rows += s.rows;
            }
        }
        Ok(Self { rows, cols, segs })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The GGML type of the blocks (of the first row range when types were stacked).
    pub fn dtype(&self) -> GgmlDType {
        self.segs[0].blocks.dtype()
    }

    /// The GGML types of the row ranges, in order.
    pub fn dtypes(&self) -> Vec<GgmlDType> {
        self.segs.iter().map(|s| s.blocks.dtype()).collect()
    }

    /// The segment holding row `r` and the row's index inside it.
    #[inline]
    fn seg(&self, r: usize) -> (&Segment, usize) {
        let s = self
            .segs
            .iter()
            .rev()
            .find(|s| s.start <= r)
            .expect("row in range");
        (s, r - s.start)
    }

    /// Dequantize row `r` into `out: [cols]` (embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (seg, r) = self.seg(r);
        let c = self.cols;
        let nb = c / QK;
        let nbk = c / QK_K;
        fn each<B>(bs: &[B], out: &mut [f32], n: usize, f: impl Fn(&B, &mut [f32])) {
            for (b, o) in bs.iter().zip(out.chunks_exact_mut(n)) {
                f(b, o);
            }
        }
        match &seg.blocks {
            Blocks::Q4_1(b) => {
                for (k, o) in (r * nb..(r + 1) * nb).zip(out.chunks_exact_mut(QK)) {
                    let (d, m) = (
                        f16::from_bits(b.d[k]).to_f32(),
                        f16::from_bits(b.m[k]).to_f32(),
                    );
                    for j in 0..QK / 2 {
                        o[j] = d * (b.qs[k][j] & 0x0F) as f32 + m;
                        o[j + QK / 2] = d * (b.qs[k][j] >> 4) as f32 + m;
                    }
                }
            }
            Blocks::Q8_0(b) => {
                for (k, o) in (r * nb..(r + 1) * nb).zip(out.chunks_exact_mut(QK)) {
                    let d = f16::from_bits(b.d[k]).to_f32();
                    for (o, &q) in o.iter_mut().zip(&b.qs[k]) {
                        *o = d * q as f32;
                    }
                }
            }
            Blocks::Q4_0(b) => each(&b[r * nb..(r + 1) * nb], out, QK, |b, o| b.dequantize(o)),
            Blocks::Q5_0(b) => each(&b[r * nb..(r + 1) * nb], out, QK, |b, o| b.dequantize(o)),
            Blocks::Q5_1(b) => each(&b[r * nb..(r + 1) * nb], out, QK, |b, o| b.dequantize(o)),
            Blocks::Q4K(b) => each(&b[r * nbk..(r + 1) * nbk], out, QK_K, |b, o| {
                b.dequantize(o)
            }),
            Blocks::Q5K(b) => each(&b[r * nbk..(r + 1) * nbk], out, QK_K, |b, o| {
                b.dequantize(o)
            }),
            Blocks::Q6K(b) => each(&b[r * nbk..(r + 1) * nbk], out, QK_K, |b, o| {
                b.dequantize(o)
            }),
            Blocks::F16(w) => {
                for (o, v) in out.iter_mut().zip(&w[r * c..(r + 1) * c]) {
                    *o = v.to_f32();
                }
            }
            Blocks::BF16(w) => {
                for (o, &v) in out.iter_mut().zip(&w[r * c..(r + 1) * c]) {
                    *o = f32::from_bits((v as u32) << 16);
                }
            }
            Blocks::F32(w) => out.copy_from_slice(&w[r * c..(r + 1) * c]),
        }
    }

    /// The whole matrix in f32 `[rows, cols]` (tests, reference numerics).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, o);
        }
        out
    }

    /// Dot of weight row `r` with activation row `i` (in the form its type takes).
    fn dot_row(&self, r: usize, acts: &Acts, i: usize, simd: bool) -> f32 {
        let (seg, r) = self.seg(r);
        let c = self.cols;
        let nb = c / QK;
        let k = r * nb..(r + 1) * nb;
        let kk = r * (c / QK_K)..(r + 1) * (c / QK_K);
        match &seg.blocks {
            Blocks::Q4_1(b) => q8::dot_q4_1(
                &b.d[k.clone()],
                &b.m[k.clone()],
                &b.qs[k],
                acts.q8_1(i),
                simd,
            ),
            Blocks::Q8_0(b) => q8::dot_q8_0(&b.d[k.clone()], &b.qs[k], acts.q8_1(i), simd),
            Blocks::Q4_0(b) => q8::dot_legacy(&b[k], acts.q8_1(i), simd),
            Blocks::Q5_0(b) => q8::dot_legacy(&b[k], acts.q8_1(i), simd),
            Blocks::Q5_1(b) => q8::dot_legacy(&b[k], acts.q8_1(i), simd),
            Blocks::Q4K(b) => kquant::dot_q4k(&b[kk], acts.q8k(i), simd),
            Blocks::Q5K(b) => kquant::dot_q5k(&b[kk], acts.q8k(i), simd),
            Blocks::Q6K(b) => kquant::dot_q6k(&b[kk], acts.q8k(i), simd),
            Blocks::F16(w) => dot_f16(acts.rounded(i), &w[r * c..(r + 1) * c]),
            Blocks::BF16(w) => dot_bf16(acts.rounded(i), &w[r * c..(r + 1) * c]),
            Blocks::F32(w) => dot_unrolled(&w[r * c..(r + 1) * c], &acts.f32[i * c..(i + 1) * c]),
        }
    }

    /// Dots of weight row `r` with `N` activation rows `i..i + N` (quantised types: the weight
    /// block is unpacked once per 4 or `N` rows). `q8_rows`: every row of `acts.q8_1`, made once
    /// per matmul and passed by reference (building the rows per call cost a fifth of a long
    /// prefill in stack copies).
    fn dot_rows<const N: usize>(
        &self,
        r: usize,
        acts: &Acts,
        q8_rows: &[Q8Row],
        i: usize,
        simd: bool,
    ) -> [f32; N] {
        let (seg, rr) = self.seg(r);
        let nb = self.cols / QK;
        let k = rr * nb..(rr + 1) * nb;
        let nbk = self.cols / QK_K;
        let kk = rr * nbk..(rr + 1) * nbk;
        let xk = || -> [&[BlockQ8K]; N] { std::array::from_fn(|j| acts.q8k(i + j)) };
        let x = || -> &[Q8Row; N] {
            q8_rows[i..i + N]
                .try_into()
                .expect("N Q8_1 activation rows")
        };
        match &seg.blocks {
            Blocks::Q4_1(b) => q8::dotn_q4_1(&b.d[k.clone()], &b.m[k.clone()], &b.qs[k], x(), simd),
            Blocks::Q8_0(b) => q8::dotn_q8_0(&b.d[k.clone()], &b.qs[k], x(), simd),
            Blocks::Q4_0(b) => q8::dotn_legacy(&b[k], x(), simd),
            Blocks::Q5_0(b) => q8::dotn_legacy(&b[k], x(), simd),
            Blocks::Q5_1(b) => q8::dotn_legacy(&b[k], x(), simd),
            Blocks::Q4K(b) => kquant::dotn_q4k(&b[kk], xk(), simd),
            Blocks::Q5K(b) => kquant::dotn_q5k(&b[kk], xk(), simd),
            Blocks::Q6K(b) => kquant::dotn_q6k(&b[kk], xk(), simd),
            _ => std::array::from_fn(|j| self.dot_row(r, acts, i + j, simd)),
        }
    }

    /// `out[i * rows + r] = y[i]` where `f(r, i0, y)` fills `y = [i0, i0 + y.len())` of output row
    /// `r`; output rows are split over the rayon pool. Within a task the activation rows go in tiles
    /// of about [`ACT_TILE_BYTES`]: every weight row of the task is dotted with one tile while the tile is in L1
    /// (a 1,000-token prefill would otherwise stream all the activations from L2 once per weight row);
    /// each task writes its rows' outputs in place.
    fn par_rows(&self, m: usize, out: &mut [f32], f: impl Fn(usize, usize, &mut [f32]) + Sync) {
        let rows = self.rows;
        // Work per output row is `m * cols`: split rows into ~4 tasks per thread, at least 16 rows.
        let threads = rayon::current_num_threads().max(1);
        let chunk = rows.div_ceil(threads * 4).max(16);
        let serial = rows * self.cols * m < 64 * 1024 || threads == 1;
        // A multiple of 8 (the widest row kernels' width).
        let tile = (ACT_TILE_BYTES / (self.cols + self.cols / 8).max(1) / 8 * 8).max(8);
        let run = |t: &mut [f32]| {
            let body = |(ci, o): (usize, &mut [f32])| {
                for i0 in (0..m).step_by(tile) {
                    let i1 = (i0 + tile).min(m);
                    for (j, y) in o.chunks_exact_mut(m).enumerate() {
                        f(ci * chunk + j, i0, &mut y[i0..i1]);
                    }
                }
            };
            if serial {
                t.chunks_mut(chunk * m).enumerate().for_each(body);
            } else {
                t.par_chunks_mut(chunk * m).enumerate().for_each(body);
            }
        };
        if m == 1 {
            run(out);
            return;
        }
        // Each task writes its own rows' outputs straight into `out[i * rows + r]` (disjoint
        // elements): no `[rows, m]` buffer, and no serial transpose of it after the parallel part.
        struct Out(*mut f32);
        // SAFETY: the tasks write disjoint elements of `out` (their own rows r), which outlives them.
        unsafe impl Sync for Out {}
        let dst = Out(out.as_mut_ptr());
        let dst = &dst;
        let body = |ci: usize| {
            let (r0, r1) = (ci * chunk, ((ci + 1) * chunk).min(rows));
            let mut buf = vec![0f32; tile.min(m)];
            for i0 in (0..m).step_by(tile) {
                let i1 = (i0 + tile).min(m);
                let y = &mut buf[..i1 - i0];
                for r in r0..r1 {
                    f(r, i0, y);
                    for (j, &v) in y.iter().enumerate() {
                        // SAFETY: (i0 + j) * rows + r < m * rows = out.len(), and only this task
                        // writes row r.
                        unsafe { *dst.0.add((i0 + j) * rows + r) = v };
                    }
                }
            }
        };
        let tasks = rows.div_ceil(chunk);
        if serial {
            (0..tasks).for_each(body);
        } else {
            (0..tasks).into_par_iter().for_each(body);
        }
    }

    /// `out[i, r] = sum_c W[r, c] * x[i, c]` for activations already in the form the weights take.
    fn matmul_acts(&self, acts: &Acts, m: usize, out: &mut [f32], simd: bool) {
        let q8_rows: Vec<Q8Row> = match &acts.q8_1 {
            Some(_) => (0..m).map(|i| acts.q8_1(i)).collect(),
            None => Vec::new(),
        };
        self.par_rows(m, out, |r, i0, y| {
            let mut j = 0;
            while j + 8 <= y.len() {
                y[j..j + 8].copy_from_slice(&self.dot_rows::<8>(r, acts, &q8_rows, i0 + j, simd));
                j += 8;
            }
            while j + 4 <= y.len() {
                y[j..j + 4].copy_from_slice(&self.dot_rows::<4>(r, acts, &q8_rows, i0 + j, simd));
                j += 4;
            }
            for (j, y) in y.iter_mut().enumerate().skip(j) {
                *y = self.dot_row(r, acts, i0 + j, simd);
            }
        });
    }

    /// `out[i, r] = sum_c W[r, c] * x[i, c]` for pre-quantized activations `xq: [m, cols / 32]`;
    /// `out: [m, rows]`. `simd` selects the AVX2 kernel (see [`simd_available`]). Weights of the
    /// 32-block types only (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
    pub fn matmul_q8(&self, xq: &[BlockQ8_1], m: usize, out: &mut [f32], simd: bool) -> Result<()> {
        let nb = self.cols / QK;
        if self.segs.iter().any(|s| s.blocks.act() != ActKind::Q8_1) {
            bail!(
                "matmul_q8: {:?} weights do not take Q8_1 activations (use matmul_into)",
                self.dtypes()
            );
        }
        if xq.len() != m * nb || out.len() != m * self.rows {
            bail!(
                "matmul_q8: {} activation blocks and {} outputs for m = {m}, weight [{}, {}]",
                xq.len(),
                out.len(),
                self.rows,
                self.cols
            );
        }
        let acts = Acts {
            cols: self.cols,
            q8_1: Some(Q8Rows::new(xq)),
            q8k: None,
            f32: &[],
            rounded: None,
        };
        self.matmul_acts(&acts, m, out, simd);
        Ok(())
    }

    /// `x: [m, cols]` f32 row-major -> `out: [m, rows]`; activations quantized once per form the
    /// weights take (Q8_1, Q8_K, f16, bf16, f32).
    pub fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        self.matmul_into_with(x, m, out, simd_available())
    }

    /// [`QMatrix::matmul_into`] with the kernel choice explicit (`simd: false` = scalar).
    pub fn matmul_into_with(&self, x: &[f32], m: usize, out: &mut [f32], simd: bool) -> Result<()> {
        if x.len() != m * self.cols || out.len() != m * self.rows {
            bail!(
                "matmul: input {} and output {} for m = {m}, weight [{}, {}]",
                x.len(),
                out.len(),
                self.rows,
                self.cols
            );
        }
        let mut kinds: Vec<ActKind> = self.segs.iter().map(|s| s.blocks.act()).collect();
        kinds.dedup();
        let acts = Acts::new(x, self.cols, &kinds);
        self.matmul_acts(&acts, m, out, simd);
        Ok(())
    }

    /// `x: [m, cols]` f32 row-major -> `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; m * self.rows];
        self.matmul_into(x, m, &mut out)?;
        Ok(out)
    }

    /// Linear layer on a tensor `x: [.., cols]` (f32, CPU) -> `[.., rows]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let cols = *dims.last().unwrap_or(&0);
        if cols != self.cols {
            candle_core::bail!(
                "quantized matmul: input has {cols} columns, weight [{}, {}]",
                self.rows,
                self.cols
            );
        }
        let m = x.elem_count() / cols.max(1);
        let data = x.flatten_all()?.to_vec1::<f32>()?;
        let out = self
            .matmul(&data, m)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let mut shape = dims.to_vec();
        if let Some(last) = shape.last_mut() {
            *last = self.rows;
        }
        Tensor::from_vec(out, shape, &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::lcg;
    use candle_core::quantized::k_quants::{self, GgmlType};

    fn quantized(w: &[f32], rows: usize, cols: usize, dtype: GgmlDType) -> QTensor {
        let t = Tensor::from_vec(w.to_vec(), (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    }

    #[test]
    fn simd_equals_scalar_on_odd_shapes() {
        for (rows, cols, m) in [
            (1, 32, 1),
            (7, 96, 3),
            (33, 160, 1),
            (70, 64, 5),
            (5, 576, 2),
            (19, 1536, 1),
        ] {
            let x = lcg(rows as u64, m * cols);
            for dtype in [
                GgmlDType::Q4_1,
                GgmlDType::Q8_0,
                GgmlDType::Q4_0,
                GgmlDType::Q5_0,
                GgmlDType::Q5_1,
            ] {
                let q =
                    QMatrix::from_qtensor(&quantized(&lcg(7, rows * cols), rows, cols, dtype), "w")
                        .unwrap();
                let xq = quantize_q8_1(&x, cols);
                let mut a = vec![0f32; m * rows];
                let mut b = vec![0f32; m * rows];
                q.matmul_q8(&xq, m, &mut a, false).unwrap();
                q.matmul_q8(&xq, m, &mut b, simd_available()).unwrap();
                for (a, b) in a.iter().zip(&b) {
                    assert!(
                        (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                        "{dtype:?} {a} vs {b}"
                    );
                }
            }
        }
    }

    const ALL_TYPES: [GgmlDType; 11] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::F32,
    ];

    /// `x` as each activation form dequantizes it (the reference the kernels must match up to
    /// f32 summation order).
    fn dequantized_acts(x: &[f32], cols: usize, kind: ActKind) -> Vec<f32> {
        match kind {
            ActKind::Q8_1 => quantize_q8_1(x, cols)
                .iter()
                .flat_map(|b| b.qs.map(|q| b.d * q as f32))
                .collect(),
            ActKind::Q8K => quantize_q8_k(x)
                .iter()
                .flat_map(|b| b.qs.map(|q| b.d * q as f32))
                .collect(),
            ActKind::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            ActKind::BF16 => x
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect(),
            ActKind::F32 => x.to_vec(),
        }
    }

    #[test]
    fn every_type_dequantizes_as_candle_and_dots_as_the_reference() {
        let (rows, cols, m) = (37, 512, 6);
        let w: Vec<f32> = lcg(21, rows * cols).iter().map(|v| v * 0.3).collect();
        let x: Vec<f32> = lcg(22, m * cols)
            .iter()
            .enumerate()
            .map(|(i, v)| if i % 61 == 0 { v * 6.0 } else { *v })
            .collect();
        for dtype in ALL_TYPES {
            let qt = quantized(&w, rows, cols, dtype);
            let q = QMatrix::from_qtensor(&qt, "w").unwrap();
            assert_eq!(q.dtype(), dtype);
            // Dequantization equals candle's (an independent implementation of ggml's layouts).
            let ours = q.dequantize();
            let theirs = qt
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(ours, theirs, "{dtype:?} dequantization");
            // Dot products equal dequantized weights . dequantized activations (f64 sums).
            let xa = dequantized_acts(&x, cols, q.segs[0].blocks.act());
            let mut scalar = vec![0f32; m * rows];
            let mut simd = vec![0f32; m * rows];
            q.matmul_into_with(&x, m, &mut scalar, false).unwrap();
            q.matmul_into_with(&x, m, &mut simd, true).unwrap();
            for i in 0..m {
                for r in 0..rows {
                    let (wr, xr) = (
                        &ours[r * cols..(r + 1) * cols],
                        &xa[i * cols..(i + 1) * cols],
                    );
                    let reference: f64 =
                        wr.iter().zip(xr).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let mag: f64 = wr
                        .iter()
                        .zip(xr)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum();
                    // Q4_1/Q5_1 dot their offset with s = f16(d * sum q): f16 rounding of s.
                    let tol = match dtype {
                        GgmlDType::Q4_1 | GgmlDType::Q5_1 => 2e-3 * mag.max(1.0),
                        _ => 1e-5 * mag.max(1.0),
                    };
                    for (path, got) in [
                        ("scalar", scalar[i * rows + r]),
                        ("simd", simd[i * rows + r]),
                    ] {
                        assert!(
                            (got as f64 - reference).abs() <= tol,
                            "{dtype:?} {path} row {r} act {i}: {got} vs {reference}"
                        );
                    }
                    let (a, b) = (scalar[i * rows + r], simd[i * rows + r]);
                    assert!(
                        (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                        "{dtype:?}: scalar {a} vs simd {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn stacked_rows_of_mixed_types_equal_their_parts() {
        let cols = 256;
        let parts: Vec<QMatrix> = [
            (5, GgmlDType::Q4K),
            (3, GgmlDType::Q4K),
            (4, GgmlDType::Q6K),
            (2, GgmlDType::Q8_0),
        ]
        .iter()
        .enumerate()
        .map(|(i, &(rows, t))| {
            QMatrix::from_qtensor(
                &quantized(&lcg(i as u64 + 40, rows * cols), rows, cols, t),
                "p",
            )
            .unwrap()
        })
        .collect();
        let refs: Vec<&QMatrix> = parts.iter().collect();
        let all = QMatrix::concat_rows(&refs).unwrap();
        assert_eq!(all.rows(), 14);
        assert_eq!(
            all.dtypes(),
            vec![GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0]
        );
        let x = lcg(50, 3 * cols);
        let y = all.matmul(&x, 3).unwrap();
        let mut start = 0;
        for p in &parts {
            let yp = p.matmul(&x, 3).unwrap();
            for i in 0..3 {
                assert_eq!(
                    &y[i * 14 + start..i * 14 + start + p.rows()],
                    &yp[i * p.rows()..(i + 1) * p.rows()]
                );
            }
            start += p.rows();
        }
    }

    #[test]
    fn unsupported_types_and_bad_shapes_are_errors() {
        let qt = quantized(&lcg(1, 4 * 256), 4, 256, GgmlDType::Q2K);
        let e = QMatrix::from_qtensor(&qt, "blk.0.attn_q.weight")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blk.0.attn_q.weight") && e.contains("Q4_K") && e.contains("Q2K"),
            "{e}"
        );
        let qt = quantized(&lcg(1, 4 * 64), 4, 64, GgmlDType::Q8_0);
        let q = QMatrix::from_qtensor(&qt, "w").unwrap();
        assert!(q.matmul(&[0.0; 63], 1).is_err());
    }

    #[test]
    fn q4_1_equals_candle_vec_dot() {
        let (rows, cols) = (9, 256);
        let w = lcg(3, rows * cols);
        let x = lcg(4, cols);
        let qt = quantized(&w, rows, cols, GgmlDType::Q4_1);
        let q = QMatrix::from_qtensor(&qt, "w").unwrap();
        // candle's own activation quantization, carried over exactly (its f16 d and s, as f32).
        let mut cx = vec![k_quants::BlockQ8_1::zeros(); cols / QK];
        k_quants::BlockQ8_1::from_float(&x, &mut cx);
        let bytes =
            unsafe { std::slice::from_raw_parts(cx.as_ptr() as *const u8, cx.len() * 36).to_vec() };
        let xq: Vec<BlockQ8_1> = bytes
            .chunks_exact(36)
            .map(|b| BlockQ8_1 {
                d: f16::from_bits(f16_bits(b, 0)).to_f32(),
                s: f16::from_bits(f16_bits(b, 2)).to_f32(),
                qs: std::array::from_fn(|j| b[4 + j] as i8),
            })
            .collect();
        let data = qt.data().unwrap();
        let cw: &[k_quants::BlockQ4_1] = unsafe {
            std::slice::from_raw_parts(
                data.as_ptr() as *const k_quants::BlockQ4_1,
                rows * cols / QK,
            )
        };
        let mut ours = vec![0f32; rows];
        q.matmul_q8(&xq, 1, &mut ours, simd_available()).unwrap();
        for r in 0..rows {
            let nb = cols / QK;
            let theirs = k_quants::BlockQ4_1::vec_dot(cols, &cw[r * nb..(r + 1) * nb], &cx);
            assert!(
                (ours[r] - theirs).abs() <= 1e-5 * theirs.abs().max(1.0),
                "row {r}: {} vs candle {theirs}",
                ours[r]
            );
        }
    }
}
