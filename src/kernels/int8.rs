//! Dynamic int8 linear layers for inference-only encoding (`LoadOptions::int8`).
//!
//! Weights are quantised once per output channel to 7-bit symmetric codes; activations are
//! quantised per row at run time to 8-bit asymmetric codes (`x ≈ scale · (q - zero)`), and the
//! products are summed exactly in i32. Why 7 bits for the weights: AVX2 `vpmaddubsw` adds two
//! u8 × i8 products into a saturating i16, and 255 · 63 · 2 = 32,130 fits where 255 · 127 · 2 does
//! not. On AVX2 the kernel retires 32 multiply-adds per `vpmaddubsw` + `vpmaddwd` + `vpaddd`,
//! about twice the f32 FMA rate; elsewhere a scalar loop computes the same integers.

use super::packed::{par_row_tasks, store_run};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output columns per packed panel (two AVX2 vectors of i32).
const NR: usize = 16;
/// Rows per microkernel call.
const MR: usize = 4;
/// Rows per parallel task (a multiple of `MR`).
const ROWS_PER_TASK: usize = 64;
/// Largest weight code: see the module doc.
const W_MAX: f32 = 63.0;

/// One group of 4 inputs for a 16-column panel: `[16 columns][4 k]` i8, 64-byte aligned so the
/// kernel's two 32-byte loads are aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Group([i8; NR * 4]);

/// `y = x W^T` with `W: [n, k]` held as 7-bit codes; see the module doc.
pub struct Int8Linear {
    n: usize,
    k: usize,
    /// `k` rounded up to a multiple of 4.
    kp: usize,
    /// Panels of `NR` output columns, each `kp / 4` groups: `[ceil(n / NR)][kp / 4]`.
    packed: Vec<Group>,
    /// Per output column: `W[c] ≈ scale[c] · code[c]`.
    scale: Vec<f32>,
    /// Per output column: `Σ_k code[c, k]`, to remove the activations' zero point.
    code_sum: Vec<i32>,
}

/// Activations of `m` rows as u8 codes `[ceil(m / MR) * MR, kp]` with per-row scale and zero.
struct QuantizedActivations {
    codes: Vec<u8>,
    scale: Vec<f32>,
    zero: Vec<i32>,
}

impl Int8Linear {
    /// From a row-major `weight: [n, k]` (HF `Linear` layout).
    pub fn new(weight: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(weight.len(), n * k, "Int8Linear: weight is not [n, k]");
        // The i32 sums hold up to 255 · 63 · k.
        assert!(
            k <= (i32::MAX / (255 * 63)) as usize,
            "Int8Linear: k = {k} overflows i32"
        );
        let kp = k.div_ceil(4) * 4;
        let panels = n.div_ceil(NR);
        let mut packed = vec![Group([0; NR * 4]); panels * kp / 4];
        let mut scale = vec![0f32; n];
        let mut code_sum = vec![0i32; n];
        for c in 0..n {
            let row = &weight[c * k..(c + 1) * k];
            let max = row.iter().fold(0f32, |m, w| m.max(w.abs()));
            let s = if max > 0.0 { max / W_MAX } else { 1.0 };
            scale[c] = s;
            let (panel, col) = (c / NR, c % NR);
            for (i, w) in row.iter().enumerate() {
                let q = (w / s).round().clamp(-W_MAX, W_MAX) as i8;
                code_sum[c] += q as i32;
                packed[panel * kp / 4 + i / 4].0[col * 4 + i % 4] = q;
            }
        }
        Self {
            n,
            k,
            kp,
            packed,
            scale,
            code_sum,
        }
    }

    /// Output width `n`.
    pub fn out_dim(&self) -> usize {
        self.n
    }

    /// `x: [m, k]` row-major -> `x W^T: [m, n]`, with `epilogue(c0, values)` applied to each
    /// row's run of up to 16 outputs from column `c0` before they are stored (bias, activation:
    /// one pass fewer over `[m, n]`).
    pub fn forward_with<F>(&self, x: &[f32], m: usize, epilogue: F) -> Vec<f32>
    where
        F: Fn(usize, &mut [f32]) + Sync,
    {
        assert_eq!(x.len(), m * self.k, "Int8Linear: input is not [m, k]");
        let a = self.quantize_rows(x, m);
        par_row_tasks(m, self.n, ROWS_PER_TASK, |row0, out| {
            self.rows_task(&a, row0, out, &epilogue)
        })
    }

    /// Output rows `row0..` (as many as `out` holds) over every panel.
    fn rows_task<F: Fn(usize, &mut [f32])>(
        &self,
        a: &QuantizedActivations,
        row0: usize,
        out: &mut [MaybeUninit<f32>],
        epilogue: &F,
    ) {
        #[cfg(target_arch = "x86_64")]
        if super::cpu().avx2() {
            // SAFETY: AVX2 was detected.
            return unsafe { x86::rows_task(self, a, row0, out, epilogue) };
        }
        rows_task_body(self, a, row0, out, kernel_scalar, epilogue)
    }

    /// Per-row codes (see [`quantize_row`]), rows padded to a multiple of `MR` and columns to
    /// `kp` with the row's zero point, which the kernel multiplies by zero weights.
    fn quantize_rows(&self, x: &[f32], m: usize) -> QuantizedActivations {
        let (k, kp) = (self.k, self.kp);
        let mp = m.div_ceil(MR) * MR;
        let mut codes = vec![0u8; mp * kp];
        let mut scale = vec![1f32; mp];
        let mut zero = vec![0i32; mp];
        codes
            .par_chunks_mut(kp)
            .zip(scale.par_iter_mut())
            .zip(zero.par_iter_mut())
            .take(m)
            .enumerate()
            .for_each(|(r, ((q, s), z))| {
                (*s, *z) = quantize_row(&mut q[..k], &x[r * k..(r + 1) * k]);
                q[k..].fill(*z as u8);
            });
        QuantizedActivations { codes, scale, zero }
    }
}

/// The body of [`Int8Linear::rows_task`], generic over the microkernel so that the AVX2 copy
/// inlines its kernel and vectorises the dequantisation and epilogue.
#[inline(always)]
fn rows_task_body<F: Fn(usize, &mut [f32])>(
    lin: &Int8Linear,
    a: &QuantizedActivations,
    row0: usize,
    out: &mut [MaybeUninit<f32>],
    kernel: impl Fn(&[u8], usize, &[Group], &mut [[i32; NR]; MR]),
    epilogue: &F,
) {
    let (n, kp) = (lin.n, lin.kp);
    let rows = out.len() / n;
    let mut acc = [[0i32; NR]; MR];
    let mut values = [0f32; NR];
    for (p, panel) in lin.packed.chunks(kp / 4).enumerate() {
        let c0 = p * NR;
        let cols = NR.min(n - c0);
        let (w_scale, code_sum) = (&lin.scale[c0..c0 + cols], &lin.code_sum[c0..c0 + cols]);
        for r0 in (0..rows).step_by(MR) {
            kernel(&a.codes[(row0 + r0) * kp..][..MR * kp], kp, panel, &mut acc);
            for (i, acc) in acc.iter().enumerate().take(rows - r0) {
                let r = row0 + r0 + i;
                let (s, z) = (a.scale[r], a.zero[r]);
                let o = &mut out[(r0 + i) * n + c0..][..cols];
                if cols == NR {
                    // Full panel: fixed-length loops, straight vector code.
                    for j in 0..NR {
                        values[j] = (acc[j] - z * code_sum[j]) as f32 * (s * w_scale[j]);
                    }
                    store_run(o, &mut values, c0, epilogue);
                } else {
                    let values = &mut values[..cols];
                    for (((v, acc), sum), ws) in
                        values.iter_mut().zip(acc).zip(code_sum).zip(w_scale)
                    {
                        *v = (acc - z * sum) as f32 * (s * ws);
                    }
                    store_run(o, values, c0, epilogue);
                }
            }
        }
    }
}

/// Asymmetric u8 codes of one row over `[min(x, 0), max(x, 0)]` (so 0 is exact):
/// `q = clamp(round(x / scale) + zero, 0, 255)`; returns `(scale, zero)`.
fn quantize_row(q: &mut [u8], x: &[f32]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu().avx2() {
        // SAFETY: AVX2 was detected.
        return unsafe { x86::quantize_row(q, x) };
    }
    quantize_row_body(q, x)
}

#[inline(always)]
fn quantize_row_body(q: &mut [u8], x: &[f32]) -> (f32, i32) {
    // Eight independent lanes so that the reductions vectorise.
    let (mut lo, mut hi) = ([0f32; 8], [0f32; 8]);
    for xs in x.chunks(8) {
        for ((lo, hi), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(xs) {
            *lo = if v < *lo { v } else { *lo };
            *hi = if v > *hi { v } else { *hi };
        }
    }
    let lo = lo.iter().fold(0f32, |a, &b| a.min(b));
    let hi = hi.iter().fold(0f32, |a, &b| a.max(b));
    let Some((scale, zero)) = scale_and_zero(lo, hi) else {
        q.fill(0);
        return (1.0, 0);
    };
    quantize_scalar(q, x, 1.0 / scale, zero);
    (scale, zero as i32)
}

/// `(scale, zero)` mapping `[lo, hi]` (which holds 0) onto 0..=255; None for an all-zero row.
fn scale_and_zero(lo: f32, hi: f32) -> Option<(f32, f32)> {
    (hi > lo).then(|| {
        let scale = (hi - lo) / 255.0;
        (scale, (-lo / scale).round().clamp(0.0, 255.0))
    })
}

#[inline(always)]
fn quantize_scalar(q: &mut [u8], x: &[f32], inv_scale: f32, zero: f32) {
    for (q, x) in q.iter_mut().zip(x) {
        *q = ((x * inv_scale).round_ties_even() + zero).clamp(0.0, 255.0) as u8;
    }
}

/// `acc[i][j] = Σ_k a[i, k] · w[j, k]` for `MR` rows of `a` (stride `kp`) and one packed panel.
fn kernel_scalar(a: &[u8], kp: usize, panel: &[Group], acc: &mut [[i32; NR]; MR]) {
    for (i, acc) in acc.iter_mut().enumerate() {
        let row = &a[i * kp..(i + 1) * kp];
        acc.fill(0);
        // Iterators without index arithmetic, so that the loop has no bounds checks and
        // vectorises (the sums are exact integers: any order gives the same result).
        for (x, group) in row.chunks_exact(4).zip(panel) {
            let x = [x[0], x[1], x[2], x[3]].map(i32::from);
            for (acc, w) in acc.iter_mut().zip(group.0.chunks_exact(4)) {
                *acc += x[0] * w[0] as i32
                    + x[1] * w[1] as i32
                    + x[2] * w[2] as i32
                    + x[3] * w[3] as i32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{
        quantize_scalar, rows_task_body, scale_and_zero, Group, Int8Linear, QuantizedActivations,
        MR, NR,
    };
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rows_task<F: Fn(usize, &mut [f32])>(
        lin: &Int8Linear,
        a: &QuantizedActivations,
        row0: usize,
        out: &mut [MaybeUninit<f32>],
        epilogue: &F,
    ) {
        let kernel = |a: &[u8], kp: usize, panel: &[Group], acc: &mut [[i32; NR]; MR]| {
            assert!(a.len() >= MR * kp && panel.len() * 4 == kp);
            // SAFETY: AVX2 is enabled in this function; the sizes were just checked.
            unsafe { kernel_4x16(a, kp, panel, acc) }
        };
        rows_task_body(lin, a, row0, out, kernel, epilogue)
    }

    /// [`quantize_row_body`] in intrinsics: the compiler turns its conditional lane updates
    /// into masked stores and its conversions into scalar code.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_row(q: &mut [u8], x: &[f32]) -> (f32, i32) {
        let n = q.len().min(x.len());
        let body = n / 32 * 32;
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for i in (0..body).step_by(8) {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            lo = _mm256_min_ps(lo, v);
            hi = _mm256_max_ps(hi, v);
        }
        let (mut l, mut h) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(l.as_mut_ptr(), lo);
        _mm256_storeu_ps(h.as_mut_ptr(), hi);
        let (mut lo, mut hi) = (0f32, 0f32);
        for &v in l.iter().chain(&h).chain(&x[body..n]) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let Some((scale, zero)) = scale_and_zero(lo, hi) else {
            q.fill(0);
            return (1.0, 0);
        };
        let inv = 1.0 / scale;
        let (vinv, vzero) = (_mm256_set1_ps(inv), _mm256_set1_ps(zero));
        // `packs`/`packus` interleave 128-bit lanes; this permutation restores the order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let codes = |p: *const f32| {
            // Round to nearest even, as the scalar path; the packs below saturate to 0..=255.
            let r = _mm256_round_ps(
                _mm256_mul_ps(_mm256_loadu_ps(p), vinv),
                _MM_FROUND_TO_NEAREST_INT,
            );
            _mm256_cvtps_epi32(_mm256_add_ps(r, vzero))
        };
        for i in (0..body).step_by(32) {
            let p = x.as_ptr().add(i);
            let ab = _mm256_packs_epi32(codes(p), codes(p.add(8)));
            let cd = _mm256_packs_epi32(codes(p.add(16)), codes(p.add(24)));
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
            _mm256_storeu_si256(q.as_mut_ptr().add(i) as *mut __m256i, bytes);
        }
        quantize_scalar(&mut q[body..n], &x[body..n], inv, zero);
        (scale, zero as i32)
    }

    /// Safety: AVX2 available, `a` holds `MR` rows of `kp` codes, `panel` holds `kp / 4` groups.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn kernel_4x16(
        a: &[u8],
        kp: usize,
        panel: &[Group],
        acc: &mut [[i32; NR]; MR],
    ) {
        let ones = _mm256_set1_epi16(1);
        let mut c = [[_mm256_setzero_si256(); 2]; MR];
        let a = a.as_ptr();
        for (g, group) in panel.iter().enumerate() {
            let w = group.0.as_ptr() as *const __m256i;
            let w0 = _mm256_load_si256(w);
            let w1 = _mm256_load_si256(w.add(1));
            for (i, c) in c.iter_mut().enumerate() {
                // Four consecutive activation codes of row i, repeated for every column.
                let x = _mm256_set1_epi32((a.add(i * kp + g * 4) as *const i32).read_unaligned());
                c[0] = _mm256_add_epi32(c[0], _mm256_madd_epi16(_mm256_maddubs_epi16(x, w0), ones));
                c[1] = _mm256_add_epi32(c[1], _mm256_madd_epi16(_mm256_maddubs_epi16(x, w1), ones));
            }
        }
        for (c, acc) in c.iter().zip(acc.iter_mut()) {
            _mm256_storeu_si256(acc.as_mut_ptr() as *mut __m256i, c[0]);
            _mm256_storeu_si256(acc.as_mut_ptr().add(8) as *mut __m256i, c[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::lcg;

    fn random(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        lcg(seed, n).into_iter().map(|v| v * amp).collect()
    }

    /// The integer products equal a naive i32 sum, and the result is within the quantisation
    /// bound of the f32 product, for shapes with row, column and input tails.
    #[test]
    fn matches_f32_within_quantisation_error() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 17, 7),
            (64, 48, 384),
            (70, 33, 1537),
            (3, 16, 4),
        ] {
            let w = random(n * k, 11 + k as u64, 0.3);
            let mut x = random(m * k, 7 + m as u64, 2.0);
            if m > 2 {
                x[k..2 * k].iter_mut().for_each(|v| *v = v.abs()); // an all-positive row
                x[2 * k..3 * k].fill(0.0); // a zero row
            }
            let lin = Int8Linear::new(&w, n, k);
            let a = lin.quantize_rows(&x, m);
            let y = lin.forward_with(&x, m, |_, _| {});
            for r in 0..m {
                let xr = &x[r * k..(r + 1) * k];
                let (sa, za) = (a.scale[r], a.zero[r]);
                for c in 0..n {
                    let wr = &w[c * k..(c + 1) * k];
                    let exact: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                    // Error bound: Σ |x| · Δw + Σ |w| · Δx + Δx · Δw per term.
                    let (dw, dx) = (lin.scale[c] / 2.0, sa / 2.0);
                    let bound: f32 = xr
                        .iter()
                        .zip(wr)
                        .map(|(a, b)| a.abs() * dw + b.abs() * dx + dx * dw)
                        .sum();
                    let got = y[r * n + c];
                    assert!(
                        (got - exact).abs() <= bound * 1.001 + 1e-6,
                        "m{m} n{n} k{k} [{r},{c}]: {got} vs {exact} (bound {bound})"
                    );
                    // The integers themselves: dequantising them reproduces the output.
                    let p = c / NR;
                    let mut acc = 0i32;
                    for i in 0..k {
                        let wq = lin.packed[p * lin.kp / 4 + i / 4].0[(c % NR) * 4 + i % 4];
                        acc += a.codes[r * lin.kp + i] as i32 * wq as i32;
                    }
                    let want = (acc - za * lin.code_sum[c]) as f32 * (sa * lin.scale[c]);
                    assert_eq!(got, want, "m{m} n{n} k{k} [{r},{c}]");
                }
            }
        }
    }

    #[test]
    fn quantize_row_dispatch_equals_scalar() {
        for n in [1, 7, 8, 32, 103, 384] {
            let x = random(n, 5 + n as u64, 3.0);
            let (mut fast, mut slow) = (vec![0u8; n], vec![0u8; n]);
            assert_eq!(
                quantize_row(&mut fast, &x),
                quantize_row_body(&mut slow, &x)
            );
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn scalar_kernel_equals_dispatched_kernel() {
        let (m, n, k) = (9, 40, 75);
        let w = random(n * k, 3, 0.2);
        let x = random(m * k, 4, 1.5);
        let lin = Int8Linear::new(&w, n, k);
        let a = lin.quantize_rows(&x, m);
        let mut slow = vec![MaybeUninit::new(0f32); m * n];
        let add_col = |c0: usize, v: &mut [f32]| {
            for (j, v) in v.iter_mut().enumerate() {
                *v += (c0 + j) as f32;
            }
        };
        rows_task_body(&lin, &a, 0, &mut slow, kernel_scalar, &add_col);
        // SAFETY: rows_task_body wrote every element.
        let slow: Vec<f32> = slow.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_eq!(lin.forward_with(&x, m, add_col), slow);
        let plain = lin.forward_with(&x, m, |_, _| {});
        for (i, (p, s)) in plain.iter().zip(&slow).enumerate() {
            assert_eq!(p + (i % n) as f32, *s);
        }
    }
}
