//! f32 inner products: `q · row` for retrieval (f32 or f16 rows; AVX2 + FMA + F16C, four rows at
//! once for graph search), and the portable 8-lane dot of the generators' raw paths.

use super::cpu;
use half::f16;

/// `a · b` over `min(len)` elements (AVX2 + FMA: four 8-wide accumulators; scalar: in order).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if cpu().avx2_fma() {
        // SAFETY: avx2 and fma were detected.
        return unsafe { x86::dot_f32(a, b) };
    }
    dot_scalar(a, b)
}

fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `a · b[i]` for four rows `b` (four independent memory streams keep more loads in flight).
#[inline]
pub fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if cpu().avx2_fma() {
        // SAFETY: avx2 and fma were detected.
        return unsafe { x86::dot4_f32(a, b) };
    }
    b.map(|r| dot_scalar(a, r))
}

/// `a · b` with `b` in f16, over `min(len)` elements.
#[inline]
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if cpu().avx2_fma_f16c() {
        // SAFETY: avx2, fma and f16c were detected.
        return unsafe { x86::dot_f16(a, b) };
    }
    a.iter().zip(b).map(|(a, b)| a * b.to_f32()).sum()
}

avx2_dispatch! {
    /// `a · b` with `b` as bf16 bits (the upper half of an f32), over `min(len)` elements, 8
    /// accumulators (BF16 GGUF weights).
    fn dot_bf16_into(a: &[f32], b: &[u16], out: &mut f32) => dot_bf16_body
}

#[inline(always)]
fn dot_bf16_body(a: &[f32], b: &[u16], out: &mut f32) {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let bf = |h: u16| f32::from_bits((h as u32) << 16);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, &y)| x * bf(y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * bf(y[i]);
        }
    }
    *out = acc.iter().sum::<f32>() + tail;
}

/// `a · b` with `b` as bf16 bits (see [`dot_bf16_into`]).
pub fn dot_bf16(a: &[f32], b: &[u16]) -> f32 {
    let mut out = 0f32;
    dot_bf16_into(a, b, &mut out);
    out
}

/// f32 dot product with 8 independent accumulators (portable; it vectorises as built): the
/// generators' raw-buffer attention and f32 GGUF weights.
pub fn dot_unrolled(a: &[f32], b: &[f32]) -> f32 {
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

/// Hint the CPU to start loading the first lines of `bytes` bytes at `ptr` (the next rows a graph
/// search will score); the hardware prefetcher streams the rest. A no-op off x86_64.
#[inline]
pub fn prefetch(ptr: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..bytes.min(256)).step_by(64) {
        // SAFETY: prefetch never faults, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                ptr.wrapping_add(line) as *const i8,
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, bytes);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// `a · b` over `min(len)` elements.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8 * j)),
                    _mm256_loadu_ps(pb.add(i + 8 * j)),
                    *acc,
                );
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut s = hsum(v);
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    /// `a · b[i]` for four rows `b` (each at least `a.len()` long).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot4_f32(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
        let n = b.iter().fold(a.len(), |n, r| n.min(r.len()));
        let pa = a.as_ptr();
        let pb = b.map(|r| r.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 8 <= n {
            let av = _mm256_loadu_ps(pa.add(i));
            for (acc, pb) in acc.iter_mut().zip(pb) {
                *acc = _mm256_fmadd_ps(av, _mm256_loadu_ps(pb.add(i)), *acc);
            }
            i += 8;
        }
        let mut out = acc.map(|v| hsum(v));
        while i < n {
            for (o, r) in out.iter_mut().zip(b) {
                *o += a[i] * r[i];
            }
            i += 1;
        }
        out
    }

    /// `a · b` with `b` in f16, over `min(len)` elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr() as *const __m128i);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let bv = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i / 8 + j)));
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8 * j)), bv, *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            let bv = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i / 8)));
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), bv, acc[0]);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut s = hsum(v);
        while i < n {
            s += a[i] * b[i].to_f32();
            i += 1;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatched_dots_match_scalar() {
        for n in [0usize, 1, 7, 8, 31, 32, 33, 384, 385] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.25).collect();
            let h: Vec<f16> = b.iter().map(|&x| f16::from_f32(x)).collect();
            let want = dot_scalar(&a, &b);
            let close = |g: f32| (g - want).abs() <= 1e-4 * (1.0 + want.abs());
            assert!(close(dot(&a, &b)), "n={n}: {} vs {want}", dot(&a, &b));
            assert!(dot4(&a, [&b, &b, &b, &b]).iter().all(|&g| close(g)));
            assert!(close(dot_f16(&a, &h)), "n={n}: f16 {}", dot_f16(&a, &h));
            assert!(close(dot_unrolled(&a, &b)), "n={n}: unrolled");
            #[cfg(target_arch = "x86_64")]
            if cpu().avx2_fma_f16c() {
                // SAFETY: the features were detected.
                let (g, g4, g16) = unsafe {
                    (
                        x86::dot_f32(&a, &b),
                        x86::dot4_f32(&a, [&b, &b, &b, &b]),
                        x86::dot_f16(&a, &h),
                    )
                };
                assert!(
                    close(g) && g4.iter().all(|&g| close(g)) && close(g16),
                    "n={n}"
                );
            }
        }
    }
}
