//! GGUF k-quant dot products (Q4_K, Q5_K, Q6_K weights × Q8_K activations), as llama.cpp's
//! ggml-cpu computes them (`ggml_vec_dot_q{4,5,6}_K_q8_K`): 256-value super-blocks, activations
//! quantised per super-block to 8 bits with an f32 scale and the sums of each 16 values (`bsums`,
//! so that the weights' per-32 offsets `min` cost one multiply-add per sub-block). Every integer
//! sum is exact, so the SIMD and scalar paths differ only in the order of the f32 additions.
//!
//! Block layouts are ggml's (`block_q4_K` etc., little-endian, f16 scales as bits). The weight
//! matrices that call these live in [`crate::generators::quant`].

use super::cpu;
use half::f16;

/// Values per super-block.
pub const QK_K: usize = 256;

/// An activation super-block: `x ≈ d * q`, `bsums[j] = sum(q[16 j..16 j + 16])`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

impl Default for BlockQ8K {
    fn default() -> Self {
        Self {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}

/// Q4_K: `x = d * sc_j * q - dmin * m_j` per 32-value sub-block `j`, with 6-bit `sc_j`, `m_j`
/// packed in `scales` and 4-bit `q` (byte `l` of each 32-byte group holds value `l` of sub-block
/// `2g` in its low nibble and of `2g + 1` in its high nibble).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4K {
    pub d: u16,
    pub dmin: u16,
    pub scales: [u8; 12],
    pub qs: [u8; QK_K / 2],
}

/// Q5_K: Q4_K plus a fifth bit per value (`qh`: bit `j` of byte `l` is the high bit of value `l`
/// of sub-block `j`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5K {
    pub d: u16,
    pub dmin: u16,
    pub scales: [u8; 12],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// Q6_K: `x = d * sc_j * (q - 32)` per 16-value sub-block, 8-bit signed `sc_j`, 6-bit `q` (low 4
/// bits in `ql`, high 2 bits in `qh`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: u16,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn h2f(h: u16) -> f32 {
    f16::from_bits(h).to_f32()
}

impl BlockQ4K {
    /// Bytes per block in a GGUF file.
    pub const BYTES: usize = 4 + 12 + QK_K / 2;

    /// Parse one block of [`Self::BYTES`] bytes.
    pub fn from_bytes(b: &[u8]) -> Self {
        Self {
            d: u16_at(b, 0),
            dmin: u16_at(b, 2),
            scales: b[4..16].try_into().expect("12 bytes"),
            qs: b[16..Self::BYTES].try_into().expect("128 bytes"),
        }
    }

    /// The 4-bit value `l` of sub-block `j`.
    #[inline]
    fn q(&self, j: usize, l: usize) -> u8 {
        let b = self.qs[32 * (j / 2) + l];
        if j.is_multiple_of(2) {
            b & 0xF
        } else {
            b >> 4
        }
    }

    /// Values of the block.
    pub fn dequantize(&self, out: &mut [f32]) {
        dequantize_k(self.d, self.dmin, &self.scales, |j, l| self.q(j, l), out)
    }
}

impl BlockQ5K {
    /// Bytes per block in a GGUF file.
    pub const BYTES: usize = 4 + 12 + QK_K / 8 + QK_K / 2;

    /// Parse one block of [`Self::BYTES`] bytes.
    pub fn from_bytes(b: &[u8]) -> Self {
        Self {
            d: u16_at(b, 0),
            dmin: u16_at(b, 2),
            scales: b[4..16].try_into().expect("12 bytes"),
            qh: b[16..48].try_into().expect("32 bytes"),
            qs: b[48..Self::BYTES].try_into().expect("128 bytes"),
        }
    }

    /// The 5-bit value `l` of sub-block `j`.
    #[inline]
    fn q(&self, j: usize, l: usize) -> u8 {
        let b = self.qs[32 * (j / 2) + l];
        let low = if j.is_multiple_of(2) { b & 0xF } else { b >> 4 };
        low | (((self.qh[l] >> j) & 1) << 4)
    }

    /// Values of the block.
    pub fn dequantize(&self, out: &mut [f32]) {
        dequantize_k(self.d, self.dmin, &self.scales, |j, l| self.q(j, l), out)
    }
}

impl BlockQ6K {
    /// Bytes per block in a GGUF file.
    pub const BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

    /// Parse one block of [`Self::BYTES`] bytes.
    pub fn from_bytes(b: &[u8]) -> Self {
        Self {
            ql: b[0..128].try_into().expect("128 bytes"),
            qh: b[128..192].try_into().expect("64 bytes"),
            scales: std::array::from_fn(|i| b[192 + i] as i8),
            d: u16_at(b, 208),
        }
    }

    /// The value `i` (0..256) as stored, 0..64 (subtract 32 for the signed value).
    #[inline]
    fn q(&self, i: usize) -> u8 {
        // 128-value halves; in each, four runs of 32 share ql bytes (low/high nibble of the first
        // or second 32 bytes) and qh bytes (2-bit fields 0..3).
        let (h, r) = (i / 128, i % 128);
        let (run, l) = (r / 32, r % 32);
        let lb = self.ql[64 * h + 32 * (run % 2) + l];
        let low = if run < 2 { lb & 0xF } else { lb >> 4 };
        let high = (self.qh[32 * h + l] >> (2 * run)) & 3;
        low | (high << 4)
    }

    /// Values of the block.
    pub fn dequantize(&self, out: &mut [f32]) {
        let d = h2f(self.d);
        for (i, o) in out.iter_mut().enumerate().take(QK_K) {
            *o = d * self.scales[i / 16] as f32 * (self.q(i) as i32 - 32) as f32;
        }
    }
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
#[inline]
fn scales_mins(q: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            sc[j] = q[j] & 63;
            m[j] = q[j + 4] & 63;
        } else {
            sc[j] = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
            m[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        }
    }
    (sc, m)
}

/// Values of a Q4_K/Q5_K block whose value `l` of 32-value sub-block `j` is `q(j, l)`:
/// `d * sc_j * q - dmin * m_j`.
fn dequantize_k(
    d: u16,
    dmin: u16,
    scales: &[u8; 12],
    q: impl Fn(usize, usize) -> u8,
    out: &mut [f32],
) {
    let (sc, m) = scales_mins(scales);
    let (d, dmin) = (h2f(d), h2f(dmin));
    for j in 0..QK_K / 32 {
        let (a, s) = (d * sc[j] as f32, dmin * m[j] as f32);
        for l in 0..32 {
            out[32 * j + l] = a * q(j, l) as f32 - s;
        }
    }
}

/// Scalar dot of a Q4_K/Q5_K block (values `q(j, l)` as in [`dequantize_k`]) with a Q8_K block:
/// `d d_x sum_j sc_j (q . a)_j - dmin d_x sum_j m_j (bsums of sub-block j)`, integer sums exact.
fn dot_k_block(
    d: u16,
    dmin: u16,
    scales: &[u8; 12],
    q: impl Fn(usize, usize) -> u8,
    x: &BlockQ8K,
) -> f32 {
    let (sc, m) = scales_mins(scales);
    let mut sumi = 0i32;
    for (j, (&sc, a)) in sc.iter().zip(x.qs.chunks_exact(32)).enumerate() {
        let s: i32 = a
            .iter()
            .enumerate()
            .map(|(l, &a)| q(j, l) as i32 * a as i32)
            .sum();
        sumi += sc as i32 * s;
    }
    let summ: i32 = (0..QK_K / 16)
        .map(|j| x.bsums[j] as i32 * m[j / 2] as i32)
        .sum();
    h2f(d) * x.d * sumi as f32 - h2f(dmin) * x.d * summ as f32
}

/// Quantize `x` (`len % 256 == 0`) to Q8_K super-blocks as ggml's `quantize_row_q8_K_ref`: the
/// value of largest magnitude maps to -127 (`d = -max / 127`, signed), `q = min(127,
/// round(x / d))` with ties to even.
pub fn quantize_q8_k(x: &[f32]) -> Vec<BlockQ8K> {
    debug_assert_eq!(x.len() % QK_K, 0);
    let mut out = vec![BlockQ8K::default(); x.len() / QK_K];
    quantize_q8_k_into(x, &mut out);
    out
}

avx2_dispatch! {
    /// [`quantize_q8_k`] into `out` (`x.len() / 256` blocks); the AVX2 copy rounds 8 lanes at a
    /// time (same values: no reassociation).
    fn quantize_q8_k_into(x: &[f32], out: &mut [BlockQ8K]) => quantize_q8_k_body
}

#[inline(always)]
fn quantize_q8_k_body(x: &[f32], out: &mut [BlockQ8K]) {
    for (xs, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        *b = BlockQ8K::default();
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = q.iter().map(|&v| v as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}

/// Whether the AVX2 k-quant kernels can run (avx2 + fma + f16c, unless forced scalar).
#[inline]
fn simd_ok(simd: bool) -> bool {
    simd && cpu().avx2_fma_f16c()
}

/// Whether the 512-bit k-quant kernels can run (AVX-512 F/BW/VL/VNNI, unless forced scalar).
#[inline]
fn avx512_ok(simd: bool) -> bool {
    simd && cpu().avx512()
}

/// Scalar `ggml_vec_dot_q4_K_q8_K`.
fn dot_q4k_scalar(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(w, x)| dot_k_block(w.d, w.dmin, &w.scales, |j, l| w.q(j, l), x))
        .sum()
}

/// Scalar `ggml_vec_dot_q5_K_q8_K`.
fn dot_q5k_scalar(w: &[BlockQ5K], x: &[BlockQ8K]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(w, x)| dot_k_block(w.d, w.dmin, &w.scales, |j, l| w.q(j, l), x))
        .sum()
}

/// Scalar `ggml_vec_dot_q6_K_q8_K`.
fn dot_q6k_scalar(w: &[BlockQ6K], x: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    for (w, x) in w.iter().zip(x) {
        let mut sumi = 0i32;
        for j in 0..QK_K / 16 {
            let s: i32 = (16 * j..16 * j + 16)
                .map(|i| (w.q(i) as i32 - 32) * x.qs[i] as i32)
                .sum();
            sumi += w.scales[j] as i32 * s;
        }
        sum += h2f(w.d) * x.d * sumi as f32;
    }
    sum
}

/// `fn $name(w, x, simd)` (one activation row) and `fn $name4(w, x: [_; N], simd)` (`N` rows,
/// each weight block unpacked once per 4 or `N` rows: prefill) over the 512-bit kernel where the CPU has AVX-512,
/// else the AVX2 one, else `$scalar`.
macro_rules! k_dots {
    ($(#[$doc:meta])* $name:ident, $name4:ident, $block:ty, $scalar:ident) => {
        $(#[$doc])*
        pub fn $name(w: &[$block], x: &[BlockQ8K], simd: bool) -> f32 {
            debug_assert_eq!(w.len(), x.len());
            #[cfg(target_arch = "x86_64")]
            {
                if avx512_ok(simd) {
                    // SAFETY: avx512 f/bw/vl/vnni, avx2, fma and f16c were detected.
                    return unsafe { avx512::$name::<1>(w, [x]) }[0];
                }
                if simd_ok(simd) {
                    // SAFETY: avx2, fma and f16c were detected.
                    return unsafe { avx2::$name::<1>(w, [x]) }[0];
                }
            }
            let _ = simd;
            $scalar(w, x)
        }

        #[doc = concat!("[`", stringify!($name), "`] of one weight row with `N` activation rows ")]
        #[doc = "(each weight block unpacked once per 4 rows on AVX2, per `N` on AVX-512: prefill)."]
        pub fn $name4<const N: usize>(w: &[$block], x: [&[BlockQ8K]; N], simd: bool) -> [f32; N] {
            debug_assert!(x.iter().all(|x| x.len() == w.len()));
            #[cfg(target_arch = "x86_64")]
            {
                if avx512_ok(simd) {
                    // SAFETY: avx512 f/bw/vl/vnni, avx2, fma and f16c were detected.
                    return unsafe { avx512::$name::<N>(w, x) };
                }
                if simd_ok(simd) && N.is_multiple_of(4) {
                    let mut out = [0f32; N];
                    for (o, x4) in out.chunks_exact_mut(4).zip(x.chunks_exact(4)) {
                        let x4: [&[BlockQ8K]; 4] = std::array::from_fn(|i| x4[i]);
                        // SAFETY: avx2, fma and f16c were detected.
                        o.copy_from_slice(&unsafe { avx2::$name::<4>(w, x4) });
                    }
                    return out;
                }
            }
            let _ = simd;
            x.map(|x| $scalar(w, x))
        }
    };
}

k_dots!(
    /// `ggml_vec_dot_q4_K_q8_K` of one weight row with one activation row (same number of
    /// blocks). `simd`: take the SIMD kernel where the CPU has it.
    dot_q4k,
    dotn_q4k,
    BlockQ4K,
    dot_q4k_scalar
);
k_dots!(
    /// `ggml_vec_dot_q5_K_q8_K` (see [`dot_q4k`]).
    dot_q5k,
    dotn_q5k,
    BlockQ5K,
    dot_q5k_scalar
);
k_dots!(
    /// `ggml_vec_dot_q6_K_q8_K` (see [`dot_q4k`]).
    dot_q6k,
    dotn_q6k,
    BlockQ6K,
    dot_q6k_scalar
);

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::q8::avx2::{h2f, hsum};
    use super::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};
    use std::arch::x86_64::*;

    /// The packed 6-bit scales and mins of a Q4_K/Q5_K block as 16 u16: scales in lanes 0..8,
    /// mins in lanes 8..16 (ggml's `utmp` shuffle).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn mins_and_scales(s: &[u8; 12]) -> __m256i {
        const KMASK1: u32 = 0x3f3f3f3f;
        const KMASK2: u32 = 0x0f0f0f0f;
        const KMASK3: u32 = 0x03030303;
        let mut u = [
            u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
            u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
            u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
            0,
        ];
        u[3] = ((u[2] >> 4) & KMASK2) | (((u[1] >> 6) & KMASK3) << 4);
        let uaux = u[1] & KMASK1;
        u[1] = (u[2] & KMASK2) | (((u[0] >> 6) & KMASK3) << 4);
        u[2] = uaux;
        u[0] &= KMASK1;
        _mm256_cvtepu8_epi16(_mm_set_epi32(
            u[3] as i32,
            u[2] as i32,
            u[1] as i32,
            u[0] as i32,
        ))
    }

    /// `-dmin * d_x * sum_j min_j * (bsums[2j] + bsums[2j + 1])` as 4 partial sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn mins_dot(ms: __m256i, x: &BlockQ8K) -> __m128i {
        let q8sums = _mm256_loadu_si256(x.bsums.as_ptr() as *const __m256i);
        let q8s = _mm_hadd_epi16(
            _mm256_castsi256_si128(q8sums),
            _mm256_extracti128_si256(q8sums, 1),
        );
        _mm_madd_epi16(_mm256_extracti128_si256(ms, 1), q8s)
    }

    /// Broadcast 16-bit lane `i` of each 128-bit half (`get_scale_shuffle_k4`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale_k4(scales: __m256i, i: usize) -> __m256i {
        let (lo, hi) = ((2 * i) as i8, (2 * i + 1) as i8);
        let m = _mm256_setr_epi8(
            lo, hi, lo, hi, lo, hi, lo, hi, lo, hi, lo, hi, lo, hi, lo, hi, lo, hi, lo, hi, lo, hi,
            lo, hi, lo, hi, lo, hi, lo, hi, lo, hi,
        );
        _mm256_shuffle_epi8(scales, m)
    }

    /// The 32-byte groups `j` of a Q4_K (`hbits: None`) or Q5_K block's values: sub-blocks `2j`
    /// (`lo`) and `2j + 1` (`hi`) as unsigned bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_k_group(qs: &[u8; 128], hbits: Option<__m256i>, j: usize) -> [__m256i; 2] {
        let m4 = _mm256_set1_epi8(0xF);
        let one = _mm256_set1_epi8(1);
        let bits = _mm256_loadu_si256(qs.as_ptr().add(32 * j) as *const __m256i);
        let mut lo = _mm256_and_si256(bits, m4);
        let mut hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
        if let Some(hb) = hbits {
            // Bit `2j` (`2j + 1`) of each qh byte, moved to bit 4.
            let bit = |s: i32| {
                _mm256_slli_epi16(
                    _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(s)), one),
                    4,
                )
            };
            lo = _mm256_or_si256(lo, bit(2 * j as i32));
            hi = _mm256_or_si256(hi, bit(2 * j as i32 + 1));
        }
        [lo, hi]
    }

    /// Accumulate one Q4_K (`qh: None`) or Q5_K block's dots with `N` activation blocks (the
    /// weight block unpacked once): the scaled integer sums into `acc`, the mins' term into
    /// `acc_m` (ggml's `ggml_vec_dot_q{4,5}_K_q8_K`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dot_k_block<const N: usize>(
        d: u16,
        dmin: u16,
        scales: &[u8; 12],
        qs: &[u8; 128],
        qh: Option<&[u8; 32]>,
        x: [&BlockQ8K; N],
        acc: &mut [__m256; N],
        acc_m: &mut [__m128; N],
    ) {
        let ms = mins_and_scales(scales);
        let dmin = h2f(dmin);
        for i in 0..N {
            acc_m[i] = _mm_fmadd_ps(
                _mm_set1_ps(-x[i].d * dmin),
                _mm_cvtepi32_ps(mins_dot(ms, x[i])),
                acc_m[i],
            );
        }
        let sc128 = _mm256_castsi256_si128(ms);
        let scales = _mm256_set_m128i(sc128, sc128);
        let hbits = qh.map(|h| _mm256_loadu_si256(h.as_ptr() as *const __m256i));
        let mut sumi = [_mm256_setzero_si256(); N];
        for j in 0..4 {
            let [lo, hi] = unpack_k_group(qs, hbits, j);
            let (s0, s1) = (scale_k4(scales, 2 * j), scale_k4(scales, 2 * j + 1));
            for i in 0..N {
                let q8 = x[i].qs.as_ptr();
                let a0 = _mm256_loadu_si256(q8.add(64 * j) as *const __m256i);
                let a1 = _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i);
                let p0 = _mm256_madd_epi16(s0, _mm256_maddubs_epi16(lo, a0));
                let p1 = _mm256_madd_epi16(s1, _mm256_maddubs_epi16(hi, a1));
                sumi[i] = _mm256_add_epi32(sumi[i], _mm256_add_epi32(p0, p1));
            }
        }
        let d = h2f(d);
        for i in 0..N {
            acc[i] = _mm256_fmadd_ps(
                _mm256_set1_ps(x[i].d * d),
                _mm256_cvtepi32_ps(sumi[i]),
                acc[i],
            );
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn finish(acc: __m256, acc_m: __m128) -> f32 {
        let m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        hsum(acc) + _mm_cvtss_f32(m)
    }

    /// [`super::dot_q4k`] of one weight row with `N` activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4k<const N: usize>(w: &[BlockQ4K], x: [&[BlockQ8K]; N]) -> [f32; N] {
        let (mut acc, mut acc_m) = ([_mm256_setzero_ps(); N], [_mm_setzero_ps(); N]);
        for (k, w) in w.iter().enumerate() {
            let xk = x.map(|x| x.get_unchecked(k));
            dot_k_block(
                w.d, w.dmin, &w.scales, &w.qs, None, xk, &mut acc, &mut acc_m,
            );
        }
        std::array::from_fn(|i| finish(acc[i], acc_m[i]))
    }

    /// [`super::dot_q5k`] of one weight row with `N` activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q5k<const N: usize>(w: &[BlockQ5K], x: [&[BlockQ8K]; N]) -> [f32; N] {
        let (mut acc, mut acc_m) = ([_mm256_setzero_ps(); N], [_mm_setzero_ps(); N]);
        for (k, w) in w.iter().enumerate() {
            let xk = x.map(|x| x.get_unchecked(k));
            dot_k_block(
                w.d,
                w.dmin,
                &w.scales,
                &w.qs,
                Some(&w.qh),
                xk,
                &mut acc,
                &mut acc_m,
            );
        }
        std::array::from_fn(|i| finish(acc[i], acc_m[i]))
    }

    /// The 2-bit field at bit `s` of each byte of `bh`, moved to bits 4..6.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn bits2(bh: __m256i, m2: __m256i, s: i32) -> __m256i {
        _mm256_slli_epi16(
            _mm256_and_si256(_mm256_srl_epi16(bh, _mm_cvtsi32_si128(s)), m2),
            4,
        )
    }

    /// `32 * sum_j sc_j * bsums_j` of a Q6_K block (16 signed scales as i16) and an activation
    /// block, as 8 partial i32 sums: the `- 32` of every Q6_K value applied once per block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6k_offset(sc16: __m256i, x: &BlockQ8K) -> __m256i {
        let bsums = _mm256_loadu_si256(x.bsums.as_ptr() as *const __m256i);
        _mm256_slli_epi32(_mm256_madd_epi16(sc16, bsums), 5)
    }

    /// [`super::dot_q6k`] of one weight row with `N` activation rows: `(q - 32) . a` as
    /// `q . a - 32 * sum(a)` (the sums from the activation's `bsums`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q6k<const N: usize>(w: &[BlockQ6K], x: [&[BlockQ8K]; N]) -> [f32; N] {
        let m4 = _mm256_set1_epi8(0xF);
        let m2 = _mm256_set1_epi8(3);
        let mut acc = [_mm256_setzero_ps(); N];
        for (kb, w) in w.iter().enumerate() {
            let xk = x.map(|x| x.get_unchecked(kb));
            let scales = _mm_loadu_si128(w.scales.as_ptr() as *const __m128i);
            let sc16 = _mm256_cvtepi8_epi16(scales);
            let mut sumi: [__m256i; N] = std::array::from_fn(|i| {
                _mm256_sub_epi32(_mm256_setzero_si256(), q6k_offset(sc16, xk[i]))
            });
            for h in 0..2 {
                let ql = w.ql.as_ptr().add(64 * h);
                let b1 = _mm256_loadu_si256(ql as *const __m256i);
                let b2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let bh = _mm256_loadu_si256(w.qh.as_ptr().add(32 * h) as *const __m256i);
                let q = [
                    _mm256_or_si256(_mm256_and_si256(b1, m4), bits2(bh, m2, 0)),
                    _mm256_or_si256(_mm256_and_si256(b2, m4), bits2(bh, m2, 2)),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(b1, 4), m4),
                        bits2(bh, m2, 4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(b2, 4), m4),
                        bits2(bh, m2, 6),
                    ),
                ];
                for (k, q) in q.iter().enumerate() {
                    // Scales of sub-blocks 8h + 2k and 8h + 2k + 1, each over 8 i16 lanes.
                    let s = (8 * h + 2 * k) as i8;
                    let t = s + 1;
                    let sh = _mm_setr_epi8(s, s, s, s, s, s, s, s, t, t, t, t, t, t, t, t);
                    let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, sh));
                    for i in 0..N {
                        let a = _mm256_loadu_si256(
                            xk[i].qs.as_ptr().add(128 * h + 32 * k) as *const __m256i
                        );
                        let p = _mm256_madd_epi16(sc, _mm256_maddubs_epi16(*q, a));
                        sumi[i] = _mm256_add_epi32(sumi[i], p);
                    }
                }
            }
            let d = h2f(w.d);
            for i in 0..N {
                acc[i] = _mm256_fmadd_ps(
                    _mm256_set1_ps(xk[i].d * d),
                    _mm256_cvtepi32_ps(sumi[i]),
                    acc[i],
                );
            }
        }
        acc.map(|a| hsum(a))
    }
}

/// The 512-bit k-quant kernels (AVX-512 F/BW/VL/VNNI): a weight super-block is unpacked once into
/// 64-byte registers holding two consecutive sub-blocks (so that the activation bytes load
/// contiguously), each multiplied with `N` activation rows by `vpmaddubsw` and scaled by the
/// sub-block scales with `vpdpwssd`. Integer sums as exact as the AVX2 and scalar paths.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::q8::avx2::h2f;
    use super::avx2::{mins_and_scales, mins_dot, q6k_offset};
    use super::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K};
    use std::arch::x86_64::*;

    /// `a` in 16-bit lanes 0..16 and `b` in lanes 16..32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn halves_epi16(a: i16, b: i16) -> __m512i {
        _mm512_mask_blend_epi16(0xFFFF_0000, _mm512_set1_epi16(a), _mm512_set1_epi16(b))
    }

    /// Sum of the 4 lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn hsum4(v: __m128) -> f32 {
        let m = _mm_add_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)))
    }

    /// One Q4_K (`qh: None`) or Q5_K block's dots with `N` activation blocks, accumulated into
    /// `acc` (scaled integer sums) and `acc_m` (the mins' term).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dot_k_block<const N: usize>(
        d: u16,
        dmin: u16,
        scales: &[u8; 12],
        qs: &[u8; 128],
        qh: Option<&[u8; 32]>,
        x: [&BlockQ8K; N],
        acc: &mut [__m512; N],
        acc_m: &mut [__m128; N],
    ) {
        let ms = mins_and_scales(scales);
        let dmin = h2f(dmin);
        for i in 0..N {
            acc_m[i] = _mm_fmadd_ps(
                _mm_set1_ps(-x[i].d * dmin),
                _mm_cvtepi32_ps(mins_dot(ms, x[i])),
                acc_m[i],
            );
        }
        let ms = _mm512_castsi256_si512(ms);
        let m4 = _mm512_set1_epi8(0xF);
        let qhh =
            qh.map(|h| _mm512_broadcast_i64x4(_mm256_loadu_si256(h.as_ptr() as *const __m256i)));
        let mut sumi = [_mm512_setzero_si512(); N];
        for g in 0..2 {
            // Bytes 0..32: sub-blocks 4g (low nibbles), 4g + 1 (high); 32..64: 4g + 2, 4g + 3.
            let bits = _mm512_loadu_si512(qs.as_ptr().add(64 * g) as *const __m512i);
            let lo = _mm512_and_si512(bits, m4);
            let hi = _mm512_and_si512(_mm512_srli_epi16(bits, 4), m4);
            // Sub-blocks (4g, 4g + 1) and (4g + 2, 4g + 3), each pair in element order.
            let mut w = [
                _mm512_shuffle_i64x2(lo, hi, 0x44),
                _mm512_shuffle_i64x2(lo, hi, 0xEE),
            ];
            for (p, w) in w.iter_mut().enumerate() {
                let (j0, j1) = (4 * g + 2 * p, 4 * g + 2 * p + 1);
                if let Some(qhh) = qhh {
                    // The fifth bit of sub-block j is bit j of each qh byte.
                    let sel = _mm512_mask_blend_epi8(
                        0xFFFF_FFFF_0000_0000,
                        _mm512_set1_epi8(1 << j0),
                        _mm512_set1_epi8((1u8 << j1) as i8),
                    );
                    let k = _mm512_test_epi8_mask(qhh, sel);
                    *w = _mm512_mask_add_epi8(*w, k, *w, _mm512_set1_epi8(16));
                }
                let sc = _mm512_permutexvar_epi16(halves_epi16(j0 as i16, j1 as i16), ms);
                for i in 0..N {
                    let a = _mm512_loadu_si512(x[i].qs.as_ptr().add(32 * j0) as *const __m512i);
                    sumi[i] = _mm512_dpwssd_epi32(sumi[i], _mm512_maddubs_epi16(*w, a), sc);
                }
            }
        }
        let d = h2f(d);
        for i in 0..N {
            acc[i] = _mm512_fmadd_ps(
                _mm512_set1_ps(x[i].d * d),
                _mm512_cvtepi32_ps(sumi[i]),
                acc[i],
            );
        }
    }

    /// [`super::dot_q4k`] of one weight row with `N` activation rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_q4k<const N: usize>(w: &[BlockQ4K], x: [&[BlockQ8K]; N]) -> [f32; N] {
        let (mut acc, mut acc_m) = ([_mm512_setzero_ps(); N], [_mm_setzero_ps(); N]);
        for (k, w) in w.iter().enumerate() {
            let xk = x.map(|x| x.get_unchecked(k));
            dot_k_block(
                w.d, w.dmin, &w.scales, &w.qs, None, xk, &mut acc, &mut acc_m,
            );
        }
        std::array::from_fn(|i| _mm512_reduce_add_ps(acc[i]) + hsum4(acc_m[i]))
    }

    /// [`super::dot_q5k`] of one weight row with `N` activation rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_q5k<const N: usize>(w: &[BlockQ5K], x: [&[BlockQ8K]; N]) -> [f32; N] {
        let (mut acc, mut acc_m) = ([_mm512_setzero_ps(); N], [_mm_setzero_ps(); N]);
        for (k, w) in w.iter().enumerate() {
            let xk = x.map(|x| x.get_unchecked(k));
            dot_k_block(
                w.d,
                w.dmin,
                &w.scales,
                &w.qs,
                Some(&w.qh),
                xk,
                &mut acc,
                &mut acc_m,
            );
        }
        std::array::from_fn(|i| _mm512_reduce_add_ps(acc[i]) + hsum4(acc_m[i]))
    }

    /// [`super::dot_q6k`] of one weight row with `N` activation rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_q6k<const N: usize>(w: &[BlockQ6K], x: [&[BlockQ8K]; N]) -> [f32; N] {
        let m4 = _mm512_set1_epi8(0xF);
        let m2 = _mm512_set1_epi8(3);
        let mut acc = [_mm512_setzero_ps(); N];
        for (kb, w) in w.iter().enumerate() {
            let xk = x.map(|x| x.get_unchecked(kb));
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(w.scales.as_ptr() as *const __m128i));
            let mut sumi: [__m512i; N] = std::array::from_fn(|i| {
                _mm512_zextsi256_si512(_mm256_sub_epi32(
                    _mm256_setzero_si256(),
                    q6k_offset(sc16, xk[i]),
                ))
            });
            let sc = _mm512_castsi256_si512(sc16);
            for h in 0..2 {
                // Bytes 0..32 / 32..64 of this half's ql: values 0..32 / 32..64 (low nibbles) and
                // 64..96 / 96..128 (high nibbles); their 2-bit highs at bits 0, 2, 4, 6 of qh.
                let b = _mm512_loadu_si512(w.ql.as_ptr().add(64 * h) as *const __m512i);
                let bh = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    w.qh.as_ptr().add(32 * h) as *const __m256i
                ));
                let high = |s0: i16, s1: i16| {
                    _mm512_slli_epi16(
                        _mm512_and_si512(_mm512_srlv_epi16(bh, halves_epi16(s0, s1)), m2),
                        4,
                    )
                };
                let q = [
                    _mm512_or_si512(_mm512_and_si512(b, m4), high(0, 2)),
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(b, 4), m4), high(4, 6)),
                ];
                for (k, q) in q.iter().enumerate() {
                    // Sub-blocks 8h + 4k .. 8h + 4k + 4, one per 128-bit lane (8 i16 lanes each).
                    let s = (8 * h + 4 * k) as i16;
                    let idx = _mm512_set_epi64(
                        0x0001_0001_0001_0001 * (s as i64 + 3),
                        0x0001_0001_0001_0001 * (s as i64 + 3),
                        0x0001_0001_0001_0001 * (s as i64 + 2),
                        0x0001_0001_0001_0001 * (s as i64 + 2),
                        0x0001_0001_0001_0001 * (s as i64 + 1),
                        0x0001_0001_0001_0001 * (s as i64 + 1),
                        0x0001_0001_0001_0001 * s as i64,
                        0x0001_0001_0001_0001 * s as i64,
                    );
                    let scv = _mm512_permutexvar_epi16(idx, sc);
                    for i in 0..N {
                        let a = _mm512_loadu_si512(
                            xk[i].qs.as_ptr().add(128 * h + 64 * k) as *const __m512i
                        );
                        sumi[i] = _mm512_dpwssd_epi32(sumi[i], _mm512_maddubs_epi16(*q, a), scv);
                    }
                }
            }
            let d = h2f(w.d);
            for i in 0..N {
                acc[i] = _mm512_fmadd_ps(
                    _mm512_set1_ps(xk[i].d * d),
                    _mm512_cvtepi32_ps(sumi[i]),
                    acc[i],
                );
            }
        }
        acc.map(|a| _mm512_reduce_add_ps(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::lcg;

    /// Random blocks: every byte random, scales as finite f16 of moderate size.
    fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
        lcg(seed, n)
            .iter()
            .map(|v| ((v + 1.0) * 127.99) as u8)
            .collect()
    }

    fn with_scale(mut b: Vec<u8>, at: &[usize], seed: u64) -> Vec<u8> {
        for (k, &i) in at.iter().enumerate() {
            let v = 0.001 + 0.01 * (lcg(seed + k as u64, 1)[0].abs());
            b[i..i + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
        }
        b
    }

    fn reference(w: &[f32], x: &[BlockQ8K]) -> f32 {
        let xs: Vec<f32> = x
            .iter()
            .flat_map(|b| b.qs.iter().map(move |&q| b.d * q as f32))
            .collect();
        w.iter()
            .zip(&xs)
            .map(|(a, b)| (*a as f64 * *b as f64) as f32)
            .sum()
    }

    fn check(name: &str, ours: f32, reference: f32, scale: f32) {
        assert!(
            (ours - reference).abs() <= 1e-4 * scale.max(1.0),
            "{name}: {ours} vs reference {reference}"
        );
    }

    #[test]
    fn q8_k_quantizer_round_trips() {
        let x: Vec<f32> = lcg(5, 3 * QK_K).iter().map(|v| v * 3.0).collect();
        let q = quantize_q8_k(&x);
        for (xs, b) in x.chunks_exact(QK_K).zip(&q) {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (v, &qv) in xs.iter().zip(&b.qs) {
                assert!((v - b.d * qv as f32).abs() <= amax / 127.0 * 0.5001);
            }
            for (s, c) in b.bsums.iter().zip(b.qs.chunks_exact(16)) {
                assert_eq!(*s as i32, c.iter().map(|&v| v as i32).sum::<i32>());
            }
        }
        assert!(quantize_q8_k(&[0.0; QK_K])[0].qs.iter().all(|&q| q == 0));
    }

    #[test]
    fn k_quant_dots_equal_dequantized_reference_scalar_and_simd() {
        let nb = 6;
        let x: Vec<f32> = lcg(9, nb * QK_K);
        let xq = quantize_q8_k(&x);
        for seed in 0..4u64 {
            // Q4_K.
            let bytes = random_bytes(seed, nb * BlockQ4K::BYTES);
            let bytes: Vec<u8> = bytes
                .chunks_exact(BlockQ4K::BYTES)
                .flat_map(|c| with_scale(c.to_vec(), &[0, 2], seed))
                .collect();
            let w: Vec<BlockQ4K> = bytes
                .chunks_exact(BlockQ4K::BYTES)
                .map(BlockQ4K::from_bytes)
                .collect();
            let mut deq = vec![0f32; nb * QK_K];
            for (b, o) in w.iter().zip(deq.chunks_exact_mut(QK_K)) {
                b.dequantize(o);
            }
            let r = reference(&deq, &xq);
            let s = deq.iter().map(|v| v.abs()).sum::<f32>();
            check("q4_K scalar", dot_q4k(&w, &xq, false), r, s);
            check("q4_K simd", dot_q4k(&w, &xq, true), r, s);
            // Q5_K.
            let bytes = random_bytes(seed + 10, nb * BlockQ5K::BYTES);
            let bytes: Vec<u8> = bytes
                .chunks_exact(BlockQ5K::BYTES)
                .flat_map(|c| with_scale(c.to_vec(), &[0, 2], seed))
                .collect();
            let w: Vec<BlockQ5K> = bytes
                .chunks_exact(BlockQ5K::BYTES)
                .map(BlockQ5K::from_bytes)
                .collect();
            for (b, o) in w.iter().zip(deq.chunks_exact_mut(QK_K)) {
                b.dequantize(o);
            }
            let r = reference(&deq, &xq);
            let s = deq.iter().map(|v| v.abs()).sum::<f32>();
            check("q5_K scalar", dot_q5k(&w, &xq, false), r, s);
            check("q5_K simd", dot_q5k(&w, &xq, true), r, s);
            // Q6_K.
            let bytes = random_bytes(seed + 20, nb * BlockQ6K::BYTES);
            let bytes: Vec<u8> = bytes
                .chunks_exact(BlockQ6K::BYTES)
                .flat_map(|c| with_scale(c.to_vec(), &[208], seed))
                .collect();
            let w: Vec<BlockQ6K> = bytes
                .chunks_exact(BlockQ6K::BYTES)
                .map(BlockQ6K::from_bytes)
                .collect();
            for (b, o) in w.iter().zip(deq.chunks_exact_mut(QK_K)) {
                b.dequantize(o);
            }
            let r = reference(&deq, &xq);
            let s = deq.iter().map(|v| v.abs()).sum::<f32>();
            check("q6_K scalar", dot_q6k(&w, &xq, false), r, s);
            check("q6_K simd", dot_q6k(&w, &xq, true), r, s);
        }
    }
    /// Every SIMD path (AVX2 and 512-bit, one and four activation rows) against the scalar one,
    /// on random blocks (all bytes random: extreme scales and values included).
    #[test]
    fn k_quant_simd_paths_equal_scalar_one_and_four_rows() {
        let nb = 3;
        let xs: Vec<Vec<BlockQ8K>> = (0..4)
            .map(|i| quantize_q8_k(&lcg(30 + i, nb * QK_K)))
            .collect();
        let x4: [&[BlockQ8K]; 4] = std::array::from_fn(|i| xs[i].as_slice());
        fn blocks<B>(seed: u64, bytes: usize, at: &[usize], f: fn(&[u8]) -> B) -> Vec<B> {
            random_bytes(seed, 3 * bytes)
                .chunks_exact(bytes)
                .map(|c| f(&with_scale(c.to_vec(), at, seed)))
                .collect()
        }
        #[allow(clippy::type_complexity)]
        fn check_all<B>(
            name: &str,
            w: &[B],
            x4: [&[BlockQ8K]; 4],
            scalar: fn(&[B], &[BlockQ8K]) -> f32,
            one: fn(&[B], &[BlockQ8K], bool) -> f32,
            four: fn(&[B], [&[BlockQ8K]; 4], bool) -> [f32; 4],
            paths: &[(
                &str,
                unsafe fn(&[B], [&[BlockQ8K]; 4]) -> [f32; 4],
                unsafe fn(&[B], [&[BlockQ8K]; 1]) -> [f32; 1],
                bool,
            )],
        ) {
            let want = x4.map(|x| scalar(w, x));
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * a.abs().max(1.0);
            let mut got = vec![("dispatch 4", four(w, x4, true))];
            got.push(("dispatch 1", x4.map(|x| one(w, x, true))));
            got.push(("scalar 4", four(w, x4, false)));
            for &(p, f4, f1, ok) in paths {
                if ok {
                    // SAFETY: the path's features were detected.
                    got.push((p, unsafe { f4(w, x4) }));
                    got.push((p, x4.map(|x| unsafe { f1(w, [x]) }[0])));
                }
            }
            for (p, g) in got {
                for i in 0..4 {
                    assert!(
                        close(want[i], g[i]),
                        "{name} {p} row {i}: {} vs scalar {}",
                        g[i],
                        want[i]
                    );
                }
            }
        }
        for seed in 0..4u64 {
            let q4 = blocks(seed, BlockQ4K::BYTES, &[0, 2], BlockQ4K::from_bytes);
            let q5 = blocks(seed + 10, BlockQ5K::BYTES, &[0, 2], BlockQ5K::from_bytes);
            let q6 = blocks(seed + 20, BlockQ6K::BYTES, &[208], BlockQ6K::from_bytes);
            // Eight rows (the AVX-512 kernels' widest use; AVX2 in fours).
            let x8: [&[BlockQ8K]; 8] = std::array::from_fn(|i| x4[i % 4]);
            let close8 = |name: &str, want: [f32; 8], got: [f32; 8]| {
                for i in 0..8 {
                    assert!(
                        (want[i] - got[i]).abs() <= 1e-5 * want[i].abs().max(1.0),
                        "{name} 8 rows, row {i}: {} vs scalar {}",
                        got[i],
                        want[i]
                    );
                }
            };
            close8(
                "q4_K",
                x8.map(|x| dot_q4k_scalar(&q4, x)),
                dotn_q4k(&q4, x8, true),
            );
            close8(
                "q5_K",
                x8.map(|x| dot_q5k_scalar(&q5, x)),
                dotn_q5k(&q5, x8, true),
            );
            close8(
                "q6_K",
                x8.map(|x| dot_q6k_scalar(&q6, x)),
                dotn_q6k(&q6, x8, true),
            );
            #[cfg(target_arch = "x86_64")]
            let (a2, a5) = (cpu().avx2_fma_f16c(), cpu().avx512());
            #[cfg(target_arch = "x86_64")]
            {
                check_all(
                    "q4_K",
                    &q4,
                    x4,
                    dot_q4k_scalar,
                    dot_q4k,
                    dotn_q4k,
                    &[
                        ("avx2", avx2::dot_q4k::<4>, avx2::dot_q4k::<1>, a2),
                        ("avx512", avx512::dot_q4k::<4>, avx512::dot_q4k::<1>, a5),
                    ],
                );
                check_all(
                    "q5_K",
                    &q5,
                    x4,
                    dot_q5k_scalar,
                    dot_q5k,
                    dotn_q5k,
                    &[
                        ("avx2", avx2::dot_q5k::<4>, avx2::dot_q5k::<1>, a2),
                        ("avx512", avx512::dot_q5k::<4>, avx512::dot_q5k::<1>, a5),
                    ],
                );
                check_all(
                    "q6_K",
                    &q6,
                    x4,
                    dot_q6k_scalar,
                    dot_q6k,
                    dotn_q6k,
                    &[
                        ("avx2", avx2::dot_q6k::<4>, avx2::dot_q6k::<1>, a2),
                        ("avx512", avx512::dot_q6k::<4>, avx512::dot_q6k::<1>, a5),
                    ],
                );
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                check_all("q4_K", &q4, x4, dot_q4k_scalar, dot_q4k, dotn_q4k, &[]);
                check_all("q5_K", &q5, x4, dot_q5k_scalar, dot_q5k, dotn_q5k, &[]);
                check_all("q6_K", &q6, x4, dot_q6k_scalar, dot_q6k, dotn_q6k, &[]);
            }
        }
    }
}
