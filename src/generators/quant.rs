//! Native CPU matmul for GGUF-quantized weights (Q4_1 and Q8_0), as llama.cpp computes it: the
//! activations are quantized per 32-block to 8 bits (`Q8_1`: scale `d`, and `s = d * sum(q)` so that
//! Q4_1's offset `m` costs one multiply per block), and each weight block is dotted with integer SIMD
//! (`ggml_vec_dot_q4_1_q8_1` / `ggml_vec_dot_q8_0_q8_0`).
//!
//! Why not candle's `QMatMul`: candle 0.11's CPU `BlockQ4_1::vec_dot` is scalar, so Q4_1 weights had to
//! be re-quantized to Q8_0 (41% more bytes to stream per token). Here Q4_1 stays Q4_1 and has an AVX2
//! kernel ([`crate::kernels::q8`]); other CPUs run the scalar fallback, chosen at runtime. Output rows are split over the rayon
//! pool; several activation rows (prefill) reuse each weight row while it is in L1.

use anyhow::{bail, Context, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::kernels::dot::dot_unrolled;
use crate::kernels::q8::{self, Q8Row, Q8Rows};
pub use crate::kernels::q8::{quantize_q8_1, BlockQ8_1, QK};

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

/// Whether the AVX2 kernels can run on this CPU (avx2 + fma + f16c; false when
/// `RUSTRAG_FORCE_SCALAR` is set): see [`crate::kernels::cpu`].
pub fn simd_available() -> bool {
    crate::kernels::cpu().avx2_fma_f16c()
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
            Blocks::Q4_1(b) => q8::dot_q4_1(&b.d[k.clone()], &b.m[k.clone()], &b.qs[k], x, simd),
            Blocks::Q8_0(b) => q8::dot_q8_0(&b.d[k.clone()], &b.qs[k], x, simd),
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
        let nb = self.cols / QK;
        let k = r * nb..(r + 1) * nb;
        match &self.blocks {
            Blocks::Q4_1(b) => q8::dot4_q4_1(&b.d[k.clone()], &b.m[k.clone()], &b.qs[k], x, simd),
            Blocks::Q8_0(b) => q8::dot4_q8_0(&b.d[k.clone()], &b.qs[k], x, simd),
            Blocks::F32(_) => x.map(|x| self.dot_row(r, x, simd)),
        }
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
                        *y = dot_unrolled(&w[r * k..(r + 1) * k], &x[i * k..(i + 1) * k]);
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
