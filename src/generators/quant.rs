//! Native CPU matmul for GGUF-quantized weights (Q4_1 and Q8_0), as llama.cpp computes it: the
//! activations are quantized per 32-block to 8 bits (`Q8_1`: scale `d`, and `s = d * sum(q)` so that
//! Q4_1's offset `m` costs one multiply per block), and each weight block is dotted with integer SIMD
//! (`ggml_vec_dot_q4_1_q8_1` / `ggml_vec_dot_q8_0_q8_0`).
//!
//! Why not candle's `QMatMul`: candle 0.11's CPU `BlockQ4_1::vec_dot` is scalar, so Q4_1 weights had to
//! be re-quantized to Q8_0 (41% more bytes to stream per token). Here Q4_1 stays Q4_1 and has an AVX2
//! kernel; other CPUs run the scalar fallback, chosen at runtime. Output rows are split over the rayon
//! pool; several activation rows (prefill) reuse each weight row while it is in L1.

use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

/// Values per quantization block (all types here).
pub const QK: usize = 32;

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

/// A quantized activation block: `x ≈ d * q`, `s = d * sum(q)` (kept in f32, unlike ggml's f16).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_1 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

impl Default for BlockQ8_1 {
    fn default() -> Self {
        Self {
            d: 0.0,
            s: 0.0,
            qs: [0; QK],
        }
    }
}

/// Quantized activations as arrays of the block fields (see [`Q4_1Blocks`]).
struct Q8Rows {
    d: Vec<f32>,
    s: Vec<f32>,
    qs: Vec<[i8; QK]>,
}

/// One activation row of [`Q8Rows`].
#[derive(Clone, Copy)]
struct Q8Row<'a> {
    d: &'a [f32],
    s: &'a [f32],
    qs: &'a [[i8; QK]],
}

impl Q8Rows {
    fn new(blocks: &[BlockQ8_1]) -> Self {
        Self {
            d: blocks.iter().map(|b| b.d).collect(),
            s: blocks.iter().map(|b| b.s).collect(),
            qs: blocks.iter().map(|b| b.qs).collect(),
        }
    }

    fn row(&self, i: usize, nb: usize) -> Q8Row<'_> {
        let k = i * nb..(i + 1) * nb;
        Q8Row {
            d: &self.d[k.clone()],
            s: &self.s[k.clone()],
            qs: &self.qs[k],
        }
    }
}

#[derive(Clone, Debug)]
enum Blocks {
    Q4_1(Q4_1Blocks),
    Q8_0(Q8_0Blocks),
    /// Unquantized weights (f32 GGUF tensors): plain f32 dots, activations not quantized.
    F32(Vec<f32>),
}

/// A quantized weight matrix `[rows, cols]` (row-major blocks, `cols % 32 == 0`), i.e. a linear layer
/// `y = x W^T` with `x: [m, cols]`, `y: [m, rows]`.
#[derive(Clone, Debug)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

fn f16_bits(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

impl QMatrix {
    /// Whether [`QMatrix::from_qtensor`] takes tensors of this type.
    pub fn supports(dtype: GgmlDType) -> bool {
        matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0 | GgmlDType::F32)
    }

    /// Copy a 2-D Q4_1, Q8_0 or F32 `QTensor` `[rows, cols]` (`name` is only used in errors).
    pub fn from_qtensor(t: &QTensor, name: &str) -> Result<Self> {
        let (rows, cols) = t
            .shape()
            .dims2()
            .with_context(|| format!("tensor `{name}`: expected a matrix"))?;
        if cols % QK != 0 && t.dtype() != GgmlDType::F32 {
            bail!("tensor `{name}`: {cols} columns is not a multiple of {QK}");
        }
        let data = t
            .data()
            .with_context(|| format!("tensor `{name}`: reading quantized data"))?;
        let n_blocks = rows * cols / QK;
        let blocks = match t.dtype() {
            GgmlDType::Q4_1 => {
                const SZ: usize = 4 + QK / 2;
                if data.len() != n_blocks * SZ {
                    bail!(
                        "tensor `{name}`: {} bytes of Q4_1 data for shape [{rows}, {cols}]",
                        data.len()
                    );
                }
                let mut b = Q4_1Blocks::default();
                for c in data.chunks_exact(SZ) {
                    b.d.push(f16_bits(c, 0));
                    b.m.push(f16_bits(c, 2));
                    b.qs.push(c[4..SZ].try_into().expect("16 bytes"));
                }
                Blocks::Q4_1(b)
            }
            GgmlDType::Q8_0 => {
                const SZ: usize = 2 + QK;
                if data.len() != n_blocks * SZ {
                    bail!(
                        "tensor `{name}`: {} bytes of Q8_0 data for shape [{rows}, {cols}]",
                        data.len()
                    );
                }
                let mut b = Q8_0Blocks::default();
                for c in data.chunks_exact(SZ) {
                    b.d.push(f16_bits(c, 0));
                    b.qs.push(std::array::from_fn(|j| c[2 + j] as i8));
                }
                Blocks::Q8_0(b)
            }
            GgmlDType::F32 => {
                if data.len() != rows * cols * 4 {
                    bail!(
                        "tensor `{name}`: {} bytes of F32 data for shape [{rows}, {cols}]",
                        data.len()
                    );
                }
                Blocks::F32(
                    data.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                )
            }
            other => bail!("tensor `{name}`: no native kernel for {other:?} (Q4_1, Q8_0, F32)"),
        };
        Ok(Self { rows, cols, blocks })
    }

    /// Stack matrices with the same type and column count: `[sum rows, cols]` (fuses projections that
    /// read the same input, e.g. q/k/v).
    pub fn concat_rows(parts: &[&QMatrix]) -> Result<Self> {
        let first = parts.first().context("concat_rows: no matrices")?;
        let cols = first.cols;
        let mut rows = 0;
        let mut blocks = match &first.blocks {
            Blocks::Q4_1(_) => Blocks::Q4_1(Q4_1Blocks::default()),
            Blocks::Q8_0(_) => Blocks::Q8_0(Q8_0Blocks::default()),
            Blocks::F32(_) => Blocks::F32(vec![]),
        };
        for p in parts {
            if p.cols != cols {
                bail!("concat_rows: {} columns vs {cols}", p.cols);
            }
            rows += p.rows;
            match (&mut blocks, &p.blocks) {
                (Blocks::Q4_1(a), Blocks::Q4_1(b)) => {
                    a.d.extend_from_slice(&b.d);
                    a.m.extend_from_slice(&b.m);
                    a.qs.extend_from_slice(&b.qs);
                }
                (Blocks::Q8_0(a), Blocks::Q8_0(b)) => {
                    a.d.extend_from_slice(&b.d);
                    a.qs.extend_from_slice(&b.qs);
                }
                (Blocks::F32(a), Blocks::F32(b)) => a.extend_from_slice(b),
                _ => bail!("concat_rows: mixed quantization types"),
            }
        }
        Ok(Self { rows, cols, blocks })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The GGML type of the blocks.
    pub fn dtype(&self) -> GgmlDType {
        match self.blocks {
            Blocks::Q4_1(_) => GgmlDType::Q4_1,
            Blocks::Q8_0(_) => GgmlDType::Q8_0,
            Blocks::F32(_) => GgmlDType::F32,
        }
    }

    /// Dequantize row `r` into `out: [cols]` (embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.cols / QK;
        match &self.blocks {
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
            Blocks::F32(w) => out.copy_from_slice(&w[r * self.cols..(r + 1) * self.cols]),
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

    /// Dot of quantized weight row `r` with one quantized activation row `x` (`cols / 32` blocks).
    fn dot_row(&self, r: usize, x: Q8Row, simd: bool) -> f32 {
        let nb = self.cols / QK;
        let k = r * nb..(r + 1) * nb;
        match &self.blocks {
            Blocks::Q4_1(b) => {
                let (d, m, qs) = (&b.d[k.clone()], &b.m[k.clone()], &b.qs[k]);
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: `simd` is only true when avx2, fma and f16c were detected at runtime.
                    return unsafe { avx2::dot_q4_1_q8_1(d, m, qs, x) };
                }
                let _ = simd;
                dot_q4_1_q8_1_scalar(d, m, qs, x)
            }
            Blocks::Q8_0(b) => {
                let (d, qs) = (&b.d[k.clone()], &b.qs[k]);
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: as above.
                    return unsafe { avx2::dot_q8_0_q8_1(d, qs, x) };
                }
                let _ = simd;
                dot_q8_0_q8_1_scalar(d, qs, x)
            }
            Blocks::F32(_) => unreachable!("f32 weights take f32 activations"),
        }
    }

    /// `out[i * rows + r] = y[i]` where `f(r, y)` fills `y: [m]` for output row `r`; output rows are
    /// split over the rayon pool (each weight row is dotted with every activation row while it is
    /// in L1).
    fn par_rows(&self, m: usize, out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
        let rows = self.rows;
        // Work per output row is `m * cols`: split rows into ~4 tasks per thread, at least 16 rows.
        let threads = rayon::current_num_threads().max(1);
        let chunk = rows.div_ceil(threads * 4).max(16);
        let serial = rows * self.cols * m < 64 * 1024 || threads == 1;
        let run = |t: &mut [f32]| {
            let body = |(ci, o): (usize, &mut [f32])| {
                for (j, y) in o.chunks_exact_mut(m).enumerate() {
                    f(ci * chunk + j, y);
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
        // `[rows, m]` so each task owns a contiguous slice, then transposed.
        let mut t = vec![0f32; rows * m];
        run(&mut t);
        for r in 0..rows {
            for i in 0..m {
                out[i * rows + r] = t[r * m + i];
            }
        }
    }

    /// Dots of weight row `r` with four activation rows at once (the weight block is unpacked once).
    fn dot_row4(&self, r: usize, x: [Q8Row; 4], simd: bool) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if simd {
            let nb = self.cols / QK;
            let k = r * nb..(r + 1) * nb;
            match &self.blocks {
                Blocks::Q4_1(b) => {
                    // SAFETY: `simd` is only true when avx2, fma and f16c were detected at runtime.
                    return unsafe {
                        avx2::dot4_q4_1_q8_1(&b.d[k.clone()], &b.m[k.clone()], &b.qs[k], x)
                    };
                }
                Blocks::Q8_0(b) => {
                    // SAFETY: as above.
                    return unsafe { avx2::dot4_q8_0_q8_1(&b.d[k.clone()], &b.qs[k], x) };
                }
                Blocks::F32(_) => {}
            }
        }
        x.map(|x| self.dot_row(r, x, simd))
    }

    /// `out[i, r] = sum_c W[r, c] * x[i, c]` for pre-quantized activations `xq: [m, cols / 32]`;
    /// `out: [m, rows]`. `simd` selects the AVX2 kernel (see [`simd_available`]). Quantized weights
    /// only.
    pub fn matmul_q8(&self, xq: &[BlockQ8_1], m: usize, out: &mut [f32], simd: bool) -> Result<()> {
        let nb = self.cols / QK;
        if matches!(self.blocks, Blocks::F32(_)) {
            bail!("matmul_q8: f32 weights take f32 activations (use matmul_into)");
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
        let acts = Q8Rows::new(xq);
        self.par_rows(m, out, |r, y| {
            let mut i = 0;
            while i + 4 <= m {
                let x = [0, 1, 2, 3].map(|j| acts.row(i + j, nb));
                y[i..i + 4].copy_from_slice(&self.dot_row4(r, x, simd));
                i += 4;
            }
            for (i, y) in y.iter_mut().enumerate().skip(i) {
                *y = self.dot_row(r, acts.row(i, nb), simd);
            }
        });
        Ok(())
    }

    /// `x: [m, cols]` f32 row-major -> `out: [m, rows]`; activations quantized to Q8_1 once for
    /// quantized weights.
    pub fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        if x.len() != m * self.cols || out.len() != m * self.rows {
            bail!(
                "matmul: input {} and output {} for m = {m}, weight [{}, {}]",
                x.len(),
                out.len(),
                self.rows,
                self.cols
            );
        }
        match &self.blocks {
            Blocks::F32(w) => {
                let k = self.cols;
                self.par_rows(m, out, |r, y| {
                    for (i, y) in y.iter_mut().enumerate() {
                        *y = dot_f32(&w[r * k..(r + 1) * k], &x[i * k..(i + 1) * k]);
                    }
                });
                Ok(())
            }
            _ => self.matmul_q8(&quantize_q8_1(x, self.cols), m, out, simd_available()),
        }
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

/// Whether the AVX2 kernels can run on this CPU (avx2 + fma + f16c, detected once).
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Quantize rows of `cols` values (`cols % 32 == 0`) to Q8_1 blocks: `d = max|x| / 127`,
/// `q = round(x / d)` (ties to even, as ggml's AVX2 path), `s = d * sum(q)` (ggml's
/// `quantize_row_q8_1`, with f32 `d` and `s`).
pub fn quantize_q8_1(x: &[f32], cols: usize) -> Vec<BlockQ8_1> {
    debug_assert_eq!(cols % QK, 0);
    let mut out = vec![BlockQ8_1::default(); x.len() / QK];
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            // SAFETY: avx2/fma/f16c detected; `xs` has exactly 32 values.
            unsafe { avx2::quantize_block(xs, b) };
        }
        return out;
    }
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
    out
}

/// f32 dot product with 8 independent accumulators (so that it vectorizes).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Scalar `ggml_vec_dot_q4_1_q8_1`.
fn dot_q4_1_q8_1_scalar(d: &[u16], m: &[u16], qs: &[[u8; QK / 2]], x: Q8Row) -> f32 {
    let mut sum = 0f32;
    for k in 0..qs.len() {
        let (q, a) = (&qs[k], &x.qs[k]);
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            sumi += (q[j] & 0x0F) as i32 * a[j] as i32 + (q[j] >> 4) as i32 * a[j + QK / 2] as i32;
        }
        sum += sumi as f32 * f16::from_bits(d[k]).to_f32() * x.d[k]
            + f16::from_bits(m[k]).to_f32() * x.s[k];
    }
    sum
}

/// Scalar `ggml_vec_dot_q8_0_q8_0` (the activation's `s` is unused).
fn dot_q8_0_q8_1_scalar(d: &[u16], qs: &[[i8; QK]], x: Q8Row) -> f32 {
    let mut sum = 0f32;
    for k in 0..qs.len() {
        let sumi: i32 = qs[k]
            .iter()
            .zip(&x.qs[k])
            .map(|(&p, &q)| p as i32 * q as i32)
            .sum();
        sum += sumi as f32 * f16::from_bits(d[k]).to_f32() * x.d[k];
    }
    sum
}

#[cfg(target_arch = "x86_64")]
// Index loops over blocks and activation rows mirror the ggml kernels.
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::{BlockQ8_1, Q8Row};
    use std::arch::x86_64::*;

    /// f16 bits -> f32 (F16C).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn h2f(h: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// [`super::quantize_q8_1`] of one 32-value block (same results as the scalar path).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_block(xs: &[f32], b: &mut BlockQ8_1) {
        let p = xs.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let sign = _mm256_set1_ps(-0.0);
        let mut amax = _mm256_andnot_ps(sign, v[0]);
        for x in &v[1..] {
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, *x));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let d = _mm_cvtss_f32(m4) / 127.0;
        let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
        let mut qi = [_mm256_setzero_si256(); 4];
        for (q, x) in qi.iter_mut().zip(&v) {
            let r = _mm256_round_ps(
                _mm256_mul_ps(*x, id),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            *q = _mm256_cvtps_epi32(r);
        }
        // Sum of q.
        let s = _mm256_add_epi32(
            _mm256_add_epi32(qi[0], qi[1]),
            _mm256_add_epi32(qi[2], qi[3]),
        );
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s4 = _mm_hadd_epi32(s4, s4);
        let s4 = _mm_hadd_epi32(s4, s4);
        let sum = _mm_cvtsi128_si32(s4);
        // i32 -> i8, back in element order (packs interleave 128-bit lanes).
        let p01 = _mm256_packs_epi32(qi[0], qi[1]);
        let p23 = _mm256_packs_epi32(qi[2], qi[3]);
        let p = _mm256_packs_epi16(p01, p23);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, p);
        b.d = d;
        b.s = d * sum as f32;
    }

    /// Integer dot of one Q4_1 block's nibbles with 32 activation bytes: 8 partial sums as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn idot_q4(q: &[u8; 16], a: &[i8; 32]) -> __m256 {
        let tmp = _mm_loadu_si128(q.as_ptr() as *const __m128i);
        let qw = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp),
            _mm256_set1_epi8(0x0F),
        );
        let qx = _mm256_loadu_si256(a.as_ptr() as *const __m256i);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(
            _mm256_maddubs_epi16(qw, qx),
            _mm256_set1_epi16(1),
        ))
    }

    /// Integer dot of one Q8_0 block with 32 activation bytes: `maddubs(|w|, sign(x, w))`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn idot_q8(q: &[i8; 32], a: &[i8; 32]) -> __m256 {
        let qw = _mm256_loadu_si256(q.as_ptr() as *const __m256i);
        let qx = _mm256_loadu_si256(a.as_ptr() as *const __m256i);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw)),
            _mm256_set1_epi16(1),
        ))
    }

    /// 8 f16 scales -> f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn h8(p: &[u16]) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.as_ptr() as *const __m128i))
    }

    /// `ggml_vec_dot_q4_1_q8_1` (AVX2): per block, the nibbles unpacked to 32 unsigned bytes are
    /// `maddubs`-ed with the signed activation bytes and accumulated as `d_w * d_x * sum`; the
    /// offsets contribute `m_w * s_x`. Scales are converted and multiplied 8 blocks at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1_q8_1(d: &[u16], m: &[u16], qs: &[[u8; 16]], x: Q8Row) -> f32 {
        let n = qs.len();
        debug_assert!(d.len() == n && m.len() == n && x.qs.len() >= n);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut summ = _mm256_setzero_ps();
        let mut dd = [0f32; 8];
        let mut k = 0;
        while k + 8 <= n {
            let dx = _mm256_loadu_ps(x.d.as_ptr().add(k));
            let sx = _mm256_loadu_ps(x.s.as_ptr().add(k));
            _mm256_storeu_ps(dd.as_mut_ptr(), _mm256_mul_ps(h8(&d[k..]), dx));
            summ = _mm256_fmadd_ps(h8(&m[k..]), sx, summ);
            for j in (0..8).step_by(2) {
                let p0 = idot_q4(qs.get_unchecked(k + j), x.qs.get_unchecked(k + j));
                let p1 = idot_q4(qs.get_unchecked(k + j + 1), x.qs.get_unchecked(k + j + 1));
                acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(&dd[j]), p0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(&dd[j + 1]), p1, acc1);
            }
            k += 8;
        }
        let mut tail = 0f32;
        while k < n {
            let (dw, mw) = (h2f(d[k]), h2f(m[k]));
            let p = idot_q4(qs.get_unchecked(k), x.qs.get_unchecked(k));
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d[k]), p, acc0);
            tail += mw * x.s[k];
            k += 1;
        }
        hsum(_mm256_add_ps(acc0, acc1)) + hsum(summ) + tail
    }

    /// Unpacked nibbles of one Q4_1 block: 32 unsigned bytes in element order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_q4(q: &[u8; 16]) -> __m256i {
        let tmp = _mm_loadu_si128(q.as_ptr() as *const __m128i);
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp),
            _mm256_set1_epi8(0x0F),
        )
    }

    /// [`dot_q4_1_q8_1`] of one weight row with four activation rows: each weight block is
    /// unpacked once and its scales converted once (prefill).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q4_1_q8_1(d: &[u16], m: &[u16], qs: &[[u8; 16]], x: [Q8Row; 4]) -> [f32; 4] {
        let n = qs.len();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summ = [_mm256_setzero_ps(); 4];
        let mut tail = [0f32; 4];
        let mut dd = [[0f32; 8]; 4];
        let mut k = 0;
        while k + 8 <= n {
            let (dw, mw) = (h8(&d[k..]), h8(&m[k..]));
            for i in 0..4 {
                let dx = _mm256_loadu_ps(x[i].d.as_ptr().add(k));
                _mm256_storeu_ps(dd[i].as_mut_ptr(), _mm256_mul_ps(dw, dx));
                let sx = _mm256_loadu_ps(x[i].s.as_ptr().add(k));
                summ[i] = _mm256_fmadd_ps(mw, sx, summ[i]);
            }
            for j in 0..8 {
                let qw = unpack_q4(qs.get_unchecked(k + j));
                for i in 0..4 {
                    let qx =
                        _mm256_loadu_si256(x[i].qs.get_unchecked(k + j).as_ptr() as *const __m256i);
                    let p =
                        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), ones));
                    acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(&dd[i][j]), p, acc[i]);
                }
            }
            k += 8;
        }
        while k < n {
            let (dw, mw) = (h2f(d[k]), h2f(m[k]));
            let qw = unpack_q4(qs.get_unchecked(k));
            for i in 0..4 {
                let qx = _mm256_loadu_si256(x[i].qs.get_unchecked(k).as_ptr() as *const __m256i);
                let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), ones));
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[i].d[k]), p, acc[i]);
                tail[i] += mw * x[i].s[k];
            }
            k += 1;
        }
        [0, 1, 2, 3].map(|i| hsum(acc[i]) + hsum(summ[i]) + tail[i])
    }

    /// [`dot_q8_0_q8_1`] of one weight row with four activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q8_0_q8_1(d: &[u16], qs: &[[i8; 32]], x: [Q8Row; 4]) -> [f32; 4] {
        let n = qs.len();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut dd = [[0f32; 8]; 4];
        let mut k = 0;
        while k + 8 <= n {
            let dw = h8(&d[k..]);
            for i in 0..4 {
                let dx = _mm256_loadu_ps(x[i].d.as_ptr().add(k));
                _mm256_storeu_ps(dd[i].as_mut_ptr(), _mm256_mul_ps(dw, dx));
            }
            for j in 0..8 {
                let qw = _mm256_loadu_si256(qs.get_unchecked(k + j).as_ptr() as *const __m256i);
                let aw = _mm256_sign_epi8(qw, qw);
                for i in 0..4 {
                    let qx =
                        _mm256_loadu_si256(x[i].qs.get_unchecked(k + j).as_ptr() as *const __m256i);
                    let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(
                        _mm256_maddubs_epi16(aw, _mm256_sign_epi8(qx, qw)),
                        ones,
                    ));
                    acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(&dd[i][j]), p, acc[i]);
                }
            }
            k += 8;
        }
        while k < n {
            let dw = h2f(d[k]);
            let qw = _mm256_loadu_si256(qs.get_unchecked(k).as_ptr() as *const __m256i);
            let aw = _mm256_sign_epi8(qw, qw);
            for i in 0..4 {
                let qx = _mm256_loadu_si256(x[i].qs.get_unchecked(k).as_ptr() as *const __m256i);
                let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(
                    _mm256_maddubs_epi16(aw, _mm256_sign_epi8(qx, qw)),
                    ones,
                ));
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[i].d[k]), p, acc[i]);
            }
            k += 1;
        }
        [0, 1, 2, 3].map(|i| hsum(acc[i]))
    }

    /// `ggml_vec_dot_q8_0_q8_0` (AVX2), scales 8 blocks at a time as above.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0_q8_1(d: &[u16], qs: &[[i8; 32]], x: Q8Row) -> f32 {
        let n = qs.len();
        debug_assert!(d.len() == n && x.qs.len() >= n);
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut dd = [0f32; 8];
        let mut k = 0;
        while k + 8 <= n {
            let dx = _mm256_loadu_ps(x.d.as_ptr().add(k));
            _mm256_storeu_ps(dd.as_mut_ptr(), _mm256_mul_ps(h8(&d[k..]), dx));
            for j in (0..8).step_by(2) {
                let p0 = idot_q8(qs.get_unchecked(k + j), x.qs.get_unchecked(k + j));
                let p1 = idot_q8(qs.get_unchecked(k + j + 1), x.qs.get_unchecked(k + j + 1));
                acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(&dd[j]), p0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(&dd[j + 1]), p1, acc1);
            }
            k += 8;
        }
        while k < n {
            let p = idot_q8(qs.get_unchecked(k), x.qs.get_unchecked(k));
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(d[k]) * x.d[k]), p, acc0);
            k += 1;
        }
        hsum(_mm256_add_ps(acc0, acc1))
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
            for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
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

    #[test]
    fn simd_quantizer_equals_scalar() {
        let x: Vec<f32> = lcg(11, 32 * 40)
            .iter()
            .enumerate()
            .map(|(i, v)| if i < 32 { 0.0 } else { v * (1 + i % 7) as f32 })
            .collect();
        let q = quantize_q8_1(&x, 32 * 40);
        for (xs, b) in x.chunks_exact(QK).zip(&q) {
            let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let qs: Vec<i8> = xs
                .iter()
                .map(|v| (v * id).round_ties_even() as i8)
                .collect();
            assert_eq!(b.qs.to_vec(), qs);
            assert_eq!(b.d, d);
            let sum: i32 = qs.iter().map(|&v| v as i32).sum();
            assert_eq!(b.s, d * sum as f32);
        }
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
