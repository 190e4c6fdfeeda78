//! Integer inner products of i16 codes (`vpmaddwd`: 16 pairs per instruction, exact i32 sums),
//! for the quantised first pass of exact search ([`crate::kb::index::quantized`]). Code rows are
//! `stride` long, a multiple of 16; the scalar paths give the same integers.

use super::cpu;
use std::ops::Range;

/// `Σ q[l] · d[l]` over the first `stride = q.len()` codes (a multiple of 16; `d` at least as long).
#[inline]
pub fn dot(q: &[i16], d: &[i16]) -> i32 {
    let stride = q.len();
    assert!(stride.is_multiple_of(16) && d.len() >= stride);
    #[cfg(target_arch = "x86_64")]
    if cpu().avx2() {
        // SAFETY: AVX2 detected; both rows hold `stride` codes.
        return unsafe { x86::dot(q.as_ptr(), d.as_ptr(), stride) };
    }
    dot_scalar(q, d)
}

fn dot_scalar(q: &[i16], d: &[i16]) -> i32 {
    q.iter().zip(d).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// [`dot`] of one query with four rows.
#[inline]
pub fn dots_1x4(q: &[i16], d: [&[i16]; 4]) -> [i32; 4] {
    let stride = q.len();
    assert!(stride.is_multiple_of(16) && d.iter().all(|d| d.len() >= stride));
    #[cfg(target_arch = "x86_64")]
    if cpu().avx2() {
        // SAFETY: AVX2 detected; every row holds `stride` codes.
        return unsafe { x86::dots_1x4(q.as_ptr(), d.map(|d| d.as_ptr()), stride) };
    }
    d.map(|d| dot_scalar(q, d))
}

/// Integer products of two queries' codes `q` with the full quads of `rows` of `codes:
/// [rows, stride]` (row scales `scale`): a row whose value `scale[row] · dot` reaches the query's
/// floor goes to `offer(query in pair, value, row)`, which returns the new floor. Returns the first
/// row not scanned, for the caller to finish in scalar code: at most 3 are left with AVX2 + FMA,
/// all of them (`rows.start`) without.
#[inline]
pub fn scan_pair(
    codes: &[i16],
    stride: usize,
    scale: &[f32],
    q: [&[i16]; 2],
    floors: [f32; 2],
    rows: Range<usize>,
    offer: &mut impl FnMut(usize, f32, u32) -> f32,
) -> usize {
    assert!(
        stride.is_multiple_of(16)
            && q.iter().all(|q| q.len() >= stride)
            && codes.len() >= rows.end * stride
            && scale.len() >= rows.end
    );
    #[cfg(target_arch = "x86_64")]
    if cpu().avx2_fma() {
        // SAFETY: AVX2 and FMA detected; the sizes were just checked.
        return unsafe { x86::scan_pair(codes, stride, scale, q, floors, rows, offer) };
    }
    let _ = (floors, offer);
    rows.start
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Integer products of two queries with the full quads of `rows`; a row whose value reaches
    /// the query's floor goes to `offer(query in pair, value, row)`, which returns the new floor.
    /// Returns the first row not scanned (at most 3 are left).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scan_pair(
        codes: &[i16],
        stride: usize,
        scale: &[f32],
        q: [&[i16]; 2],
        floors: [f32; 2],
        rows: Range<usize>,
        offer: &mut impl FnMut(usize, f32, u32) -> f32,
    ) -> usize {
        let codes = codes.as_ptr();
        let qc = q.map(|q| q.as_ptr());
        // Lanes 0..4: the first query with four rows; lanes 4..8: the second with the same rows.
        let mut floor = _mm256_setr_m128(_mm_set1_ps(floors[0]), _mm_set1_ps(floors[1]));
        let mut first = rows.start;
        while first + 4 <= rows.end {
            let d = std::array::from_fn(|j| codes.add((first + j) * stride));
            let dots = dots_2x4(qc, d, stride);
            let scale = _mm256_broadcast_ps(&*(scale.as_ptr().add(first) as *const __m128));
            let value = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(dots));
            let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(value, floor));
            if hit != 0 {
                let mut v = [0f32; 8];
                _mm256_storeu_ps(v.as_mut_ptr(), value);
                let mut f = [0f32; 8];
                _mm256_storeu_ps(f.as_mut_ptr(), floor);
                let mut f = [f[0], f[4]];
                for l in 0..8 {
                    if hit & (1 << l) != 0 {
                        f[l / 4] = offer(l / 4, v[l], (first + l % 4) as u32);
                    }
                }
                floor = _mm256_setr_m128(_mm_set1_ps(f[0]), _mm_set1_ps(f[1]));
            }
            first += 4;
        }
        first
    }

    /// `Σ q[l] · d[l]` over `stride` (a multiple of 16).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot(q: *const i16, d: *const i16, stride: usize) -> i32 {
        let mut acc = [_mm256_setzero_si256(); 2];
        let mut i = 0;
        while i + 32 <= stride {
            for (j, acc) in acc.iter_mut().enumerate() {
                let qv = _mm256_loadu_si256(q.add(i + 16 * j) as *const __m256i);
                let dv = _mm256_loadu_si256(d.add(i + 16 * j) as *const __m256i);
                *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(qv, dv));
            }
            i += 32;
        }
        if i < stride {
            let qv = _mm256_loadu_si256(q.add(i) as *const __m256i);
            let dv = _mm256_loadu_si256(d.add(i) as *const __m256i);
            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(qv, dv));
        }
        let v = _mm256_add_epi32(acc[0], acc[1]);
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// `Σ q[l] · d[j][l]` over `stride` (a multiple of 16).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dots_1x4(q: *const i16, d: [*const i16; 4], stride: usize) -> [i32; 4] {
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut i = 0;
        while i < stride {
            let qv = _mm256_loadu_si256(q.add(i) as *const __m256i);
            for (acc, d) in acc.iter_mut().zip(d) {
                let dv = _mm256_loadu_si256(d.add(i) as *const __m256i);
                *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(qv, dv));
            }
            i += 16;
        }
        let h = _mm256_hadd_epi32(
            _mm256_hadd_epi32(acc[0], acc[1]),
            _mm256_hadd_epi32(acc[2], acc[3]),
        );
        let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
        let mut out = [0i32; 4];
        _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, s);
        out
    }

    /// `Σ q[i][l] · d[j][l]` over `stride` (a multiple of 16) for two
    /// query code rows and four row codes: `[q0·d0..q0·d3, q1·d0..q1·d3]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dots_2x4(q: [*const i16; 2], d: [*const i16; 4], stride: usize) -> __m256i {
        let mut acc = [[_mm256_setzero_si256(); 4]; 2];
        let mut i = 0;
        while i < stride {
            let qv = q.map(|q| _mm256_loadu_si256(q.add(i) as *const __m256i));
            for (j, d) in d.iter().enumerate() {
                let dv = _mm256_loadu_si256(d.add(i) as *const __m256i);
                for (acc, qv) in acc.iter_mut().zip(qv) {
                    acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(qv, dv));
                }
            }
            i += 16;
        }
        // Per query: [rows 0..4 summed over the low 128-bit halves | over the high halves].
        let h = acc.map(|a| {
            _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]))
        });
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(h[0], h[1]),
            _mm256_permute2x128_si256::<0x31>(h[0], h[1]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatched_dots_equal_scalar() {
        for stride in [16usize, 32, 48, 400] {
            let row = |seed: usize| -> Vec<i16> {
                (0..stride)
                    .map(|i| ((i * 7919 + seed * 31) % 4095) as i16 - 2047)
                    .collect()
            };
            let (q, d) = (row(1), [row(2), row(3), row(4), row(5)]);
            let want = d.each_ref().map(|d| dot_scalar(&q, d));
            assert_eq!(dot(&q, &d[0]), want[0]);
            assert_eq!(dots_1x4(&q, d.each_ref().map(|d| d.as_slice())), want);
            let codes: Vec<i16> = d.concat();
            let scale = [0.5f32, 1.0, 2.0, 4.0];
            let mut seen = vec![];
            let rest = scan_pair(
                &codes,
                stride,
                &scale,
                [&q, &q],
                [f32::NEG_INFINITY; 2],
                0..4,
                &mut |i, v, r| {
                    seen.push((i, v, r));
                    f32::NEG_INFINITY
                },
            );
            if rest == 0 {
                assert!(seen.is_empty());
            } else {
                assert_eq!(rest, 4);
                for (i, v, r) in seen {
                    assert!(i < 2);
                    assert_eq!(v, scale[r as usize] * want[r as usize] as f32);
                }
            }
        }
    }
}
