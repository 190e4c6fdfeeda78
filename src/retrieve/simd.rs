//! Inner products of f32 queries with stored rows (f32 or f16) for graph search: AVX2 + FMA (+ F16C)
//! on x86_64 when the CPU has them, a portable loop otherwise.

use crate::kb::{EmbeddingDtype, EmbeddingMatrix};
use half::f16;

enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// Scores rows of one embedding matrix against f32 queries.
pub(crate) struct RowScorer<'a> {
    rows: Rows<'a>,
    dim: usize,
    simd: bool,
}

impl<'a> RowScorer<'a> {
    pub fn new(matrix: &'a EmbeddingMatrix) -> Self {
        let rows = match matrix.dtype() {
            EmbeddingDtype::F32 => Rows::F32(matrix.as_f32().expect("f32 matrix")),
            EmbeddingDtype::F16 => Rows::F16(matrix.as_f16().expect("f16 matrix")),
        };
        Self {
            rows,
            dim: matrix.dim(),
            simd: has_simd(),
        }
    }

    /// `q · row`, `q: [dim]`.
    #[inline]
    pub fn score(&self, q: &[f32], row: usize) -> f32 {
        let d = self.dim;
        match &self.rows {
            Rows::F32(m) => {
                let r = &m[row * d..(row + 1) * d];
                #[cfg(target_arch = "x86_64")]
                if self.simd {
                    // SAFETY: `has_simd` checked avx2, fma and f16c at construction.
                    return unsafe { x86::dot_f32(q, r) };
                }
                q.iter().zip(r).map(|(a, b)| a * b).sum()
            }
            Rows::F16(m) => {
                let r = &m[row * d..(row + 1) * d];
                #[cfg(target_arch = "x86_64")]
                if self.simd {
                    // SAFETY: as above.
                    return unsafe { x86::dot_f16(q, r) };
                }
                q.iter().zip(r).map(|(a, b)| a * b.to_f32()).sum()
            }
        }
    }

    /// Scores of four rows at once (four independent memory streams keep more loads in flight).
    #[inline]
    pub fn score4(&self, q: &[f32], rows: [usize; 4]) -> [f32; 4] {
        let d = self.dim;
        match &self.rows {
            Rows::F32(m) => {
                let r = rows.map(|row| &m[row * d..(row + 1) * d]);
                #[cfg(target_arch = "x86_64")]
                if self.simd {
                    // SAFETY: `has_simd` checked avx2 and fma at construction.
                    return unsafe { x86::dot4_f32(q, r) };
                }
                r.map(|r| q.iter().zip(r).map(|(a, b)| a * b).sum())
            }
            Rows::F16(_) => rows.map(|row| self.score(q, row)),
        }
    }

    /// Hint the CPU to start loading `row` (the next vectors a graph search will score).
    #[inline]
    pub fn prefetch(&self, row: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let (ptr, bytes) = match &self.rows {
                Rows::F32(m) => (m[row * self.dim..].as_ptr() as *const i8, 4 * self.dim),
                Rows::F16(m) => (m[row * self.dim..].as_ptr() as *const i8, 2 * self.dim),
            };
            // The first lines; the hardware prefetcher streams the rest of the row.
            for line in (0..bytes.min(256)).step_by(64) {
                // SAFETY: prefetch never faults; the address is inside the row.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        ptr.add(line),
                    )
                };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = row;
    }
}

/// `a · b` over `min(len)` elements.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_simd() {
        // SAFETY: `has_simd` checked avx2 and fma.
        return unsafe { x86::dot_f32(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// AVX2 (integer lanes) is available.
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn has_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
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
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
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
    pub unsafe fn dot4_f32(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
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
    pub unsafe fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
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
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_dots_match_scalar() {
        if !super::has_simd() {
            return;
        }
        for n in [0usize, 1, 7, 8, 31, 32, 33, 384, 385] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.25).collect();
            let h: Vec<half::f16> = b.iter().map(|&x| half::f16::from_f32(x)).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let got = unsafe { super::x86::dot_f32(&a, &b) };
            let got4 = unsafe { super::x86::dot4_f32(&a, [&b, &b, &b, &b]) };
            assert!(got4
                .iter()
                .all(|g| (g - want).abs() <= 1e-4 * (1.0 + want.abs())));
            let got16 = unsafe { super::x86::dot_f16(&a, &h) };
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "n={n}: {got} vs {want}"
            );
            assert!(
                (got16 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "n={n}: {got16} vs {want}"
            );
        }
    }
}
