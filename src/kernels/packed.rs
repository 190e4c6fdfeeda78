//! f32 linear layers with weights packed once at load into 16-column panels, for the fused
//! inference path: `y = x W^T` by a 6 × 16 AVX2/FMA microkernel (12 accumulators) that walks a
//! panel once per 6 rows, with an epilogue hook for bias and activation.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output columns per panel (two AVX2 vectors).
const NR: usize = 16;
/// Rows per microkernel call.
const MR: usize = 6;
/// Rows per parallel task.
const ROWS_PER_TASK: usize = 48;

/// One input's weights for a 16-column panel, 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Slice([f32; NR]);

/// `y = x W^T` with `W: [n, k]` packed as `[ceil(n / 16)][k][16]`.
pub struct PackedLinear {
    n: usize,
    k: usize,
    packed: Vec<Slice>,
}

impl PackedLinear {
    /// From a row-major `weight: [n, k]` (HF `Linear` layout).
    pub fn new(weight: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(weight.len(), n * k, "PackedLinear: weight is not [n, k]");
        let mut packed = vec![Slice([0.0; NR]); n.div_ceil(NR) * k];
        for c in 0..n {
            for (i, w) in weight[c * k..(c + 1) * k].iter().enumerate() {
                packed[(c / NR) * k + i].0[c % NR] = *w;
            }
        }
        Self { n, k, packed }
    }

    /// Output width `n`.
    pub fn out_dim(&self) -> usize {
        self.n
    }

    /// `x: [m, k]` row-major -> `x W^T: [m, n]`, with `epilogue(c0, values)` applied to each
    /// row's run of up to 16 outputs from column `c0` before they are stored.
    pub fn forward_with<F>(&self, x: &[f32], m: usize, epilogue: F) -> Vec<f32>
    where
        F: Fn(usize, &mut [f32]) + Sync,
    {
        assert_eq!(x.len(), m * self.k, "PackedLinear: input is not [m, k]");
        par_row_tasks(m, self.n, ROWS_PER_TASK, |row0, out| {
            self.rows_task(&x[row0 * self.k..], out, &epilogue)
        })
    }

    fn rows_task<F: Fn(usize, &mut [f32])>(
        &self,
        x: &[f32],
        out: &mut [MaybeUninit<f32>],
        epilogue: &F,
    ) {
        #[cfg(target_arch = "x86_64")]
        if super::cpu().avx2_fma() {
            // SAFETY: the features were detected.
            return unsafe { x86::rows_task(self, x, out, epilogue) };
        }
        rows_task_body(self, x, out, kernel_scalar, epilogue)
    }
}

/// A `[m, n]` output computed in parallel tasks of `rows_per_task` rows: `task(row0, out)` must
/// write every element of its `out` (rows `row0..`), so nothing is zeroed first.
pub(crate) fn par_row_tasks(
    m: usize,
    n: usize,
    rows_per_task: usize,
    task: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let len = m * n;
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(rows_per_task * n)
        .enumerate()
        .for_each(|(i, out)| task(i * rows_per_task, out));
    // SAFETY: every task wrote every element of its chunk.
    unsafe { out.set_len(len) };
    out
}

/// Apply `epilogue(c0, values)` to one row's run of outputs from column `c0`, then store it.
#[inline(always)]
pub(crate) fn store_run<F: Fn(usize, &mut [f32])>(
    out: &mut [MaybeUninit<f32>],
    values: &mut [f32],
    c0: usize,
    epilogue: &F,
) {
    epilogue(c0, values);
    for (o, v) in out.iter_mut().zip(values.iter()) {
        o.write(*v);
    }
}

/// Output rows for `x` (the task's rows first) over every panel; generic over the microkernel
/// so that the AVX2 copy inlines it.
#[inline(always)]
fn rows_task_body<F: Fn(usize, &mut [f32])>(
    lin: &PackedLinear,
    x: &[f32],
    out: &mut [MaybeUninit<f32>],
    kernel: impl Fn(&[f32], usize, usize, &[Slice], &mut [[f32; NR]; MR]),
    epilogue: &F,
) {
    let (n, k) = (lin.n, lin.k);
    let rows = out.len() / n;
    let mut acc = [[0f32; NR]; MR];
    for (p, panel) in lin.packed.chunks(k).enumerate() {
        let c0 = p * NR;
        let cols = NR.min(n - c0);
        for r0 in (0..rows).step_by(MR) {
            let live = MR.min(rows - r0);
            kernel(&x[r0 * k..(r0 + live) * k], k, live, panel, &mut acc);
            for (i, acc) in acc.iter_mut().enumerate().take(live) {
                let o = &mut out[(r0 + i) * n + c0..][..cols];
                store_run(o, &mut acc[..cols], c0, epilogue);
            }
        }
    }
}

/// `acc[i][j] = Σ_k a[i, k] · w[j, k]` for `live` rows of `a` (stride `k`) and one panel.
fn kernel_scalar(a: &[f32], k: usize, live: usize, panel: &[Slice], acc: &mut [[f32; NR]; MR]) {
    for (i, acc) in acc.iter_mut().enumerate().take(live) {
        acc.fill(0.0);
        for (kk, w) in panel.iter().enumerate() {
            let x = a[i * k + kk];
            for (acc, w) in acc.iter_mut().zip(&w.0) {
                *acc += x * w;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{rows_task_body, PackedLinear, Slice, MR, NR};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rows_task<F: Fn(usize, &mut [f32])>(
        lin: &PackedLinear,
        x: &[f32],
        out: &mut [MaybeUninit<f32>],
        epilogue: &F,
    ) {
        let kernel = |a: &[f32], k: usize, live: usize, panel: &[Slice], acc: &mut _| {
            assert!((1..=MR).contains(&live) && a.len() >= live * k && panel.len() == k);
            // SAFETY: the features are enabled here; the sizes were just checked.
            unsafe { kernel_6x16(a, k, live, panel, acc) }
        };
        rows_task_body(lin, x, out, kernel, epilogue)
    }

    /// Safety: AVX2 + FMA available; `a` holds `live` (1..=6) rows of `k`; `panel` has `k` slices.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel_6x16(
        a: &[f32],
        k: usize,
        live: usize,
        panel: &[Slice],
        acc: &mut [[f32; NR]; MR],
    ) {
        // Rows past `live` repeat the last one (valid memory; their sums are not stored).
        let rows: [*const f32; MR] = std::array::from_fn(|i| a.as_ptr().add(i.min(live - 1) * k));
        let mut c = [[_mm256_setzero_ps(); 2]; MR];
        for (kk, w) in panel.iter().enumerate() {
            let w0 = _mm256_load_ps(w.0.as_ptr());
            let w1 = _mm256_load_ps(w.0.as_ptr().add(8));
            for (c, row) in c.iter_mut().zip(&rows) {
                let x = _mm256_broadcast_ss(&*row.add(kk));
                c[0] = _mm256_fmadd_ps(x, w0, c[0]);
                c[1] = _mm256_fmadd_ps(x, w1, c[1]);
            }
        }
        for (c, acc) in c.iter().zip(acc.iter_mut()) {
            _mm256_storeu_ps(acc.as_mut_ptr(), c[0]);
            _mm256_storeu_ps(acc.as_mut_ptr().add(8), c[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::lcg;

    #[test]
    fn matches_naive_product() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 17, 7),
            (7, 48, 384),
            (97, 33, 129),
            (48, 16, 4),
        ] {
            let w = lcg(3 + k as u64, n * k);
            let x = lcg(9 + m as u64, m * k);
            let lin = PackedLinear::new(&w, n, k);
            let y = lin.forward_with(&x, m, |c0, v| v.iter_mut().for_each(|v| *v += c0 as f32));
            let mut slow = vec![MaybeUninit::new(0f32); m * n];
            for (task, out) in slow.chunks_mut(ROWS_PER_TASK * n).enumerate() {
                let x = &x[task * ROWS_PER_TASK * k..];
                rows_task_body(&lin, x, out, kernel_scalar, &|_, _| {});
            }
            for r in 0..m {
                for c in 0..n {
                    let want: f32 = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum();
                    let want = want + (c / NR * NR) as f32;
                    let got = y[r * n + c];
                    let tol = 1e-5 * (k as f32).sqrt() * (1.0 + want.abs());
                    assert!(
                        (got - want).abs() <= tol,
                        "m{m} n{n} k{k} [{r},{c}]: {got} vs {want}"
                    );
                    // SAFETY: rows_task_body wrote every element.
                    let scalar = unsafe { slow[r * n + c].assume_init() } + (c / NR * NR) as f32;
                    assert!((got - scalar).abs() <= tol, "scalar kernel [{r},{c}]");
                }
            }
        }
    }
}
