//! GGUF quantised dot products, as llama.cpp computes them: activations quantised per 32-block to
//! 8 bits (`Q8_1`: scale `d`, and `s = d * sum(q)` so that Q4_1's offset `m` costs one multiply per
//! block), each weight block (Q4_1 or Q8_0, scales as f16 bits) dotted with integer SIMD
//! (`ggml_vec_dot_q4_1_q8_1` / `ggml_vec_dot_q8_0_q8_0`: AVX2, or AVX-512 VNNI two blocks per
//! register and up to 8 activation rows per weight-block unpack); a scalar loop computes the same
//! sums elsewhere. The weight matrices that call these live in [`crate::generators::quant`].

use super::cpu;
use half::f16;

/// Values per quantization block (all types here).
pub const QK: usize = 32;

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

/// Quantized activations as arrays of the block fields (struct of arrays, so that the kernels
/// convert 8 scales at a time).
pub struct Q8Rows {
    d: Vec<f32>,
    s: Vec<f32>,
    qs: Vec<[i8; QK]>,
}

/// One activation row of [`Q8Rows`].
#[derive(Clone, Copy)]
pub struct Q8Row<'a> {
    d: &'a [f32],
    s: &'a [f32],
    qs: &'a [[i8; QK]],
}

impl Q8Rows {
    pub fn new(blocks: &[BlockQ8_1]) -> Self {
        Self {
            d: blocks.iter().map(|b| b.d).collect(),
            s: blocks.iter().map(|b| b.s).collect(),
            qs: blocks.iter().map(|b| b.qs).collect(),
        }
    }

    /// Row `i` of rows of `nb` blocks.
    pub fn row(&self, i: usize, nb: usize) -> Q8Row<'_> {
        let k = i * nb..(i + 1) * nb;
        Q8Row {
            d: &self.d[k.clone()],
            s: &self.s[k.clone()],
            qs: &self.qs[k],
        }
    }
}

/// Quantize rows of `cols` values (`cols % 32 == 0`) to Q8_1 blocks: `d = max|x| / 127`,
/// `q = round(x * 127 / max|x|)` (ties to even, as ggml's AVX2 path), `s = d * sum(q)`, `d` and
/// `s` rounded to f16 (ggml's `quantize_row_q8_1`; its `Q8_0` is the same `d` and `q`).
pub fn quantize_q8_1(x: &[f32], cols: usize) -> Vec<BlockQ8_1> {
    debug_assert_eq!(cols % QK, 0);
    let mut out = vec![BlockQ8_1::default(); x.len() / QK];
    #[cfg(target_arch = "x86_64")]
    if cpu().avx2_fma_f16c() {
        for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            // SAFETY: avx2/fma/f16c detected; `xs` has exactly 32 values.
            unsafe { avx2::quantize_block(xs, b) };
        }
        return out;
    }
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        (b.d, b.s) = scales(amax, sum);
    }
    out
}

/// The block scale `d = amax / 127` and `s = d * sum(q)` as ggml stores them: rounded to f16 (the
/// values q are computed with the unrounded `127 / amax`).
#[inline]
fn scales(amax: f32, sum: i32) -> (f32, f32) {
    let d = amax / 127.0;
    let r = |v: f32| f16::from_f32(v).to_f32();
    (r(d), r(d * sum as f32))
}

/// `ggml_vec_dot_q4_1_q8_1` of one Q4_1 weight row (`d`, `m`: f16 bits per block; `qs`: nibbles)
/// with one activation row. `simd`: take the AVX2 kernel where the CPU has it.
#[inline]
pub fn dot_q4_1(d: &[u16], m: &[u16], qs: &[[u8; QK / 2]], x: Q8Row, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if simd && cpu().avx512() {
            // SAFETY: avx512 f/bw/vl/vnni, avx2, fma and f16c were detected.
            return unsafe { avx512::dot_q4_1(d, m, qs, &[x]) }[0];
        }
        if simd && cpu().avx2_fma_f16c() {
            // SAFETY: avx2, fma and f16c were detected.
            return unsafe { avx2::dot_q4_1_q8_1(d, m, qs, x) };
        }
    }
    let _ = simd;
    dot_q4_1_q8_1_scalar(d, m, qs, x)
}

/// [`dot_q4_1`] of one weight row with `N` activation rows (the weight block is unpacked once
/// per 4 rows on AVX2, per `N` on AVX-512: prefill).
#[inline]
pub fn dotn_q4_1<const N: usize>(
    d: &[u16],
    m: &[u16],
    qs: &[[u8; QK / 2]],
    x: &[Q8Row; N],
    simd: bool,
) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    {
        if simd && cpu().avx512() {
            // SAFETY: avx512 f/bw/vl/vnni, avx2, fma and f16c were detected.
            return unsafe { avx512::dot_q4_1(d, m, qs, x) };
        }
        if simd && cpu().avx2_fma_f16c() && N.is_multiple_of(4) {
            // SAFETY: avx2, fma and f16c were detected.
            return by_four(x, |x4| unsafe { avx2::dot4_q4_1_q8_1(d, m, qs, x4) });
        }
    }
    (*x).map(|x| dot_q4_1(d, m, qs, x, simd))
}

/// `f` over the activation rows in fours (`N % 4 == 0`).
#[cfg(target_arch = "x86_64")]
#[inline]
fn by_four<'a, const N: usize>(
    x: &[Q8Row<'a>; N],
    f: impl Fn(&[Q8Row<'a>; 4]) -> [f32; 4],
) -> [f32; N] {
    let mut out = [0f32; N];
    for (o, x4) in out.chunks_exact_mut(4).zip(x.chunks_exact(4)) {
        o.copy_from_slice(&f(x4.try_into().expect("four rows")));
    }
    out
}

/// `ggml_vec_dot_q8_0_q8_0` of one Q8_0 weight row (`d`: f16 bits per block) with one activation
/// row (its `s` is unused). `simd`: take the AVX2 kernel where the CPU has it.
#[inline]
pub fn dot_q8_0(d: &[u16], qs: &[[i8; QK]], x: Q8Row, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if simd && cpu().avx512() {
            // SAFETY: avx512 f/bw/vl/vnni, avx2, fma and f16c were detected.
            return unsafe { avx512::dot_q8_0(d, qs, &[x]) }[0];
        }
        if simd && cpu().avx2_fma_f16c() {
            // SAFETY: avx2, fma and f16c were detected.
            return unsafe { avx2::dot_q8_0_q8_1(d, qs, x) };
        }
    }
    let _ = simd;
    dot_q8_0_q8_1_scalar(d, qs, x)
}

/// [`dot_q8_0`] of one weight row with `N` activation rows (see [`dotn_q4_1`]).
#[inline]
pub fn dotn_q8_0<const N: usize>(
    d: &[u16],
    qs: &[[i8; QK]],
    x: &[Q8Row; N],
    simd: bool,
) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    {
        if simd && cpu().avx512() {
            // SAFETY: avx512 f/bw/vl/vnni, avx2, fma and f16c were detected.
            return unsafe { avx512::dot_q8_0(d, qs, x) };
        }
        if simd && cpu().avx2_fma_f16c() && N.is_multiple_of(4) {
            // SAFETY: avx2, fma and f16c were detected.
            return by_four(x, |x4| unsafe { avx2::dot4_q8_0_q8_1(d, qs, x4) });
        }
    }
    (*x).map(|x| dot_q8_0(d, qs, x, simd))
}

/// The 32-value legacy blocks dotted through [`dot_legacy`]: Q4_0 (`x = d * (q - 8)`), Q5_0
/// (`x = d * (q - 16)`, a fifth bit per value in `qh`) and Q5_1 (`x = d * q + m`). Byte `j` of
/// `qs` holds value `j` in its low nibble and `j + 16` in its high one; bit `j` of `qh` (little
/// endian) is the high bit of value `j`.
pub trait LegacyBlock: Copy + Send + Sync {
    /// GGUF bytes per block.
    const BYTES: usize;
    /// 0: Q4_0, 1: Q5_0, 2: Q5_1 (selects the SIMD unpacking).
    const KIND: u8;
    fn from_bytes(b: &[u8]) -> Self;
    fn d(&self) -> u16;
    /// The offset `m` (f16 bits) of Q5_1; 0 for the symmetric types.
    fn m(&self) -> u16 {
        0
    }
    fn qs(&self) -> &[u8; QK / 2];
    fn qh(&self) -> [u8; 4] {
        [0; 4]
    }
    /// The 32 integer values (Q4_0, Q5_0: signed; Q5_1: 0..32).
    fn values(&self) -> [i8; QK] {
        let qh = u32::from_le_bytes(self.qh());
        let q = self.qs();
        std::array::from_fn(|j| {
            let (nib, bit) = if j < 16 {
                (q[j] & 0xF, (qh >> j) & 1)
            } else {
                (q[j - 16] >> 4, (qh >> j) & 1)
            };
            let v = nib as i8 | ((bit as i8) << 4);
            match Self::KIND {
                0 => nib as i8 - 8,
                1 => v - 16,
                _ => v,
            }
        })
    }
    /// Dequantize into `out: [32]`.
    fn dequantize(&self, out: &mut [f32]) {
        let (d, m) = (
            f16::from_bits(self.d()).to_f32(),
            f16::from_bits(self.m()).to_f32(),
        );
        for (o, v) in out.iter_mut().zip(self.values()) {
            *o = d * v as f32 + m;
        }
    }
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

/// A GGUF Q4_0 block (see [`LegacyBlock`]).
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_0 {
    pub d: u16,
    pub qs: [u8; QK / 2],
}

/// A GGUF Q5_0 block (see [`LegacyBlock`]).
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5_0 {
    pub d: u16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// A GGUF Q5_1 block (see [`LegacyBlock`]).
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5_1 {
    pub d: u16,
    pub m: u16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

impl LegacyBlock for BlockQ4_0 {
    const BYTES: usize = 2 + QK / 2;
    const KIND: u8 = 0;
    fn from_bytes(b: &[u8]) -> Self {
        Self {
            d: u16_at(b, 0),
            qs: b[2..18].try_into().expect("16 bytes"),
        }
    }
    fn d(&self) -> u16 {
        self.d
    }
    fn qs(&self) -> &[u8; QK / 2] {
        &self.qs
    }
}

impl LegacyBlock for BlockQ5_0 {
    const BYTES: usize = 2 + 4 + QK / 2;
    const KIND: u8 = 1;
    fn from_bytes(b: &[u8]) -> Self {
        Self {
            d: u16_at(b, 0),
            qh: b[2..6].try_into().expect("4 bytes"),
            qs: b[6..22].try_into().expect("16 bytes"),
        }
    }
    fn d(&self) -> u16 {
        self.d
    }
    fn qs(&self) -> &[u8; QK / 2] {
        &self.qs
    }
    fn qh(&self) -> [u8; 4] {
        self.qh
    }
}

impl LegacyBlock for BlockQ5_1 {
    const BYTES: usize = 4 + 4 + QK / 2;
    const KIND: u8 = 2;
    fn from_bytes(b: &[u8]) -> Self {
        Self {
            d: u16_at(b, 0),
            m: u16_at(b, 2),
            qh: b[4..8].try_into().expect("4 bytes"),
            qs: b[8..24].try_into().expect("16 bytes"),
        }
    }
    fn d(&self) -> u16 {
        self.d
    }
    fn m(&self) -> u16 {
        self.m
    }
    fn qs(&self) -> &[u8; QK / 2] {
        &self.qs
    }
    fn qh(&self) -> [u8; 4] {
        self.qh
    }
}

/// `ggml_vec_dot_q4_0_q8_0`, `ggml_vec_dot_q5_0_q8_0`, `ggml_vec_dot_q5_1_q8_1` of one weight row
/// with one activation row: `sum_k d_w d_x sum(q_w q_x) + m_w s_x`. `simd`: take the AVX2 kernel
/// where the CPU has it.
pub fn dot_legacy<B: LegacyBlock>(w: &[B], x: Q8Row, simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if simd && cpu().avx512() {
            // SAFETY: avx512 f/bw/vl/vnni, avx2, fma and f16c were detected.
            return unsafe { avx512::dot_legacy(w, &[x]) }[0];
        }
        if simd && cpu().avx2_fma_f16c() {
            // SAFETY: avx2, fma and f16c were detected.
            return unsafe { avx2::dot_legacy(w, x) };
        }
    }
    let _ = simd;
    let mut sum = 0f32;
    for (k, b) in w.iter().enumerate() {
        let sumi: i32 = b
            .values()
            .iter()
            .zip(&x.qs[k])
            .map(|(&p, &q)| p as i32 * q as i32)
            .sum();
        sum += sumi as f32 * f16::from_bits(b.d()).to_f32() * x.d[k];
        if B::KIND == 2 {
            sum += f16::from_bits(b.m()).to_f32() * x.s[k];
        }
    }
    sum
}

/// [`dot_legacy`] of one weight row with `N` activation rows (see [`dotn_q4_1`]).
pub fn dotn_legacy<B: LegacyBlock, const N: usize>(
    w: &[B],
    x: &[Q8Row; N],
    simd: bool,
) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    {
        if simd && cpu().avx512() {
            // SAFETY: avx512 f/bw/vl/vnni, avx2, fma and f16c were detected.
            return unsafe { avx512::dot_legacy(w, x) };
        }
        if simd && cpu().avx2_fma_f16c() && N.is_multiple_of(4) {
            // SAFETY: avx2, fma and f16c were detected.
            return by_four(x, |x4| unsafe { avx2::dot4_legacy(w, x4) });
        }
    }
    (*x).map(|x| dot_legacy(w, x, simd))
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
pub(super) mod avx2 {
    use super::{BlockQ8_1, LegacyBlock, Q8Row};
    use std::arch::x86_64::*;

    /// f16 bits -> f32 (F16C).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::kernels) unsafe fn h2f(h: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::kernels) unsafe fn hsum(v: __m256) -> f32 {
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
        let amax = _mm_cvtss_f32(m4);
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
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
        (b.d, b.s) = super::scales(amax, sum);
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
    pub(super) unsafe fn unpack_q4(q: &[u8; 16]) -> __m256i {
        let tmp = _mm_loadu_si128(q.as_ptr() as *const __m128i);
        _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp),
            _mm256_set1_epi8(0x0F),
        )
    }

    /// [`dot_q4_1_q8_1`] of one weight row with four activation rows: each weight block is
    /// unpacked once and its scales converted once (prefill).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q4_1_q8_1(
        d: &[u16],
        m: &[u16],
        qs: &[[u8; 16]],
        x: &[Q8Row; 4],
    ) -> [f32; 4] {
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

    /// 32 bytes, 0xFF where bit `j` of `qh` is set (ggml's `bytes_from_bits_32`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn bytes_from_bits(qh: [u8; 4]) -> __m256i {
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(i32::from_le_bytes(qh)), shuf);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }

    /// One legacy block's 32 values as bytes: signed for Q4_0/Q5_0, unsigned (0..32) for Q5_1.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn unpack_legacy_raw<B: LegacyBlock>(b: &B) -> __m256i {
        let nib = unpack_q4(b.qs());
        match B::KIND {
            0 => _mm256_sub_epi8(nib, _mm256_set1_epi8(8)),
            1 => {
                let hi = _mm256_andnot_si256(bytes_from_bits(b.qh()), _mm256_set1_epi8(-16));
                _mm256_or_si256(nib, hi)
            }
            _ => {
                let hi = _mm256_and_si256(bytes_from_bits(b.qh()), _mm256_set1_epi8(0x10));
                _mm256_or_si256(nib, hi)
            }
        }
    }

    /// One legacy block as 32 bytes and the form its products take: (`|w|` or `w` as unsigned
    /// bytes, sign source) — Q4_0/Q5_0 are signed (dotted with the sign trick: `|w| * sign(x,
    /// w)`), Q5_1 is unsigned (`w * x` directly; no sign source).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack_legacy<B: LegacyBlock>(b: &B) -> (__m256i, Option<__m256i>) {
        let qw = unpack_legacy_raw(b);
        if B::KIND == 2 {
            (qw, None)
        } else {
            (_mm256_sign_epi8(qw, qw), Some(qw))
        }
    }

    /// The 8 partial integer sums of an unpacked block with 32 activation bytes, as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn idot_legacy(w: (__m256i, Option<__m256i>), a: &[i8; 32]) -> __m256 {
        let qx = _mm256_loadu_si256(a.as_ptr() as *const __m256i);
        let qx = match w.1 {
            Some(sign) => _mm256_sign_epi8(qx, sign),
            None => qx,
        };
        _mm256_cvtepi32_ps(_mm256_madd_epi16(
            _mm256_maddubs_epi16(w.0, qx),
            _mm256_set1_epi16(1),
        ))
    }

    /// [`super::dot_legacy`] (AVX2): each block unpacked to 32 bytes ([`unpack_legacy`]), scales
    /// applied per block in f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_legacy<B: LegacyBlock>(w: &[B], x: Q8Row) -> f32 {
        // Two accumulators: one FMA chain would serialise the blocks on its latency.
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut summ = 0f32;
        for (k, b) in w.iter().enumerate() {
            let p = idot_legacy(unpack_legacy(b), x.qs.get_unchecked(k));
            acc[k & 1] = _mm256_fmadd_ps(_mm256_set1_ps(h2f(b.d()) * x.d[k]), p, acc[k & 1]);
            if B::KIND == 2 {
                summ += h2f(b.m()) * x.s[k];
            }
        }
        hsum(_mm256_add_ps(acc[0], acc[1])) + summ
    }

    /// [`dot_legacy`] of one weight row with four activation rows (each block unpacked once).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_legacy<B: LegacyBlock>(w: &[B], x: &[Q8Row; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summ = [0f32; 4];
        for (k, b) in w.iter().enumerate() {
            let u = unpack_legacy(b);
            let d = h2f(b.d());
            for i in 0..4 {
                let p = idot_legacy(u, x[i].qs.get_unchecked(k));
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * x[i].d[k]), p, acc[i]);
                if B::KIND == 2 {
                    summ[i] += h2f(b.m()) * x[i].s[k];
                }
            }
        }
        [0, 1, 2, 3].map(|i| hsum(acc[i]) + summ[i])
    }

    /// [`dot_q8_0_q8_1`] of one weight row with four activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q8_0_q8_1(d: &[u16], qs: &[[i8; 32]], x: &[Q8Row; 4]) -> [f32; 4] {
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

/// The 512-bit legacy kernels (AVX-512 F/BW/VL/VNNI): two consecutive 32-value weight blocks per
/// 64-byte register (unpacked by the AVX2 helpers), dotted with `N` activation rows by `vpdpbusd`
/// (unsigned weight bytes × signed activation bytes, exact i32 sums; signed weights as `|w|` with
/// the activation negated where `w < 0`, as the AVX2 sign trick), each block's 8 sums scaled by
/// `d_w d_x` in f32.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
pub(super) mod avx512 {
    use super::avx2::{unpack_legacy_raw, unpack_q4};
    use super::{LegacyBlock, Q8Row, QK};
    use std::arch::x86_64::*;

    /// Two 32-byte halves as one register.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn join(lo: __m256i, hi: __m256i) -> __m512i {
        _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
    }

    /// Signed weight bytes as (`|w|`, the lanes where `w < 0`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn abs_sign(w: __m512i) -> (__m512i, __mmask64) {
        (_mm512_abs_epi8(w), _mm512_movepi8_mask(w))
    }

    /// The shared loop: blocks in groups of 8 (`d(k)`, `m(k)`: f16 bits of block `k`'s scale and,
    /// when `offset`, its offset dotted with the activation's `s`), pairs of blocks from
    /// `w2(k, two)` (block `k`, and `k + 1` when `two`, else zeros: weight bytes and sign lanes).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn rows<const N: usize>(
        n: usize,
        x: &[Q8Row; N],
        offset: bool,
        d: impl Fn(usize) -> u16,
        m: impl Fn(usize) -> u16,
        w2: impl Fn(usize, bool) -> (__m512i, __mmask64),
    ) -> [f32; N] {
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); N];
        let mut summ = [_mm256_setzero_ps(); N];
        let mut k = 0;
        while k < n {
            let g = (n - k).min(8);
            let gm = ((1u32 << g) - 1) as __mmask8;
            let (mut dh, mut mh) = ([0u16; 8], [0u16; 8]);
            for j in 0..g {
                dh[j] = d(k + j);
                if offset {
                    mh[j] = m(k + j);
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(dh.as_ptr() as *const __m128i));
            let mut dd = [_mm512_setzero_ps(); N];
            for i in 0..N {
                let dx = _mm256_maskz_loadu_ps(gm, x[i].d.as_ptr().add(k));
                dd[i] = _mm512_castps256_ps512(_mm256_mul_ps(dw, dx));
                if offset {
                    let mw = _mm256_cvtph_ps(_mm_loadu_si128(mh.as_ptr() as *const __m128i));
                    let sx = _mm256_maskz_loadu_ps(gm, x[i].s.as_ptr().add(k));
                    summ[i] = _mm256_fmadd_ps(mw, sx, summ[i]);
                }
            }
            let mut j = 0;
            while j < g {
                let two = j + 1 < g;
                let (w, neg) = w2(k + j, two);
                // Lanes 0..8: block j's d_w d_x; 8..16: block j + 1's.
                let idx = _mm512_mask_blend_epi32(
                    0xFF00,
                    _mm512_set1_epi32(j as i32),
                    _mm512_set1_epi32(j as i32 + 1),
                );
                let am: __mmask64 = if two { !0 } else { 0xFFFF_FFFF };
                for i in 0..N {
                    let a = _mm512_maskz_loadu_epi8(am, x[i].qs.as_ptr().add(k + j) as *const i8);
                    let a = _mm512_mask_sub_epi8(a, neg, zero, a);
                    let p = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, w, a));
                    acc[i] = _mm512_fmadd_ps(p, _mm512_permutexvar_ps(idx, dd[i]), acc[i]);
                }
                j += 2;
            }
            k += g;
        }
        std::array::from_fn(|i| _mm512_reduce_add_ps(acc[i]) + super::avx2::hsum(summ[i]))
    }

    /// [`super::dot_legacy`] of one weight row with `N` activation rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_legacy<B: LegacyBlock, const N: usize>(w: &[B], x: &[Q8Row; N]) -> [f32; N] {
        rows(
            w.len(),
            x,
            B::KIND == 2,
            |k| w.get_unchecked(k).d(),
            |k| w.get_unchecked(k).m(),
            |k, two| {
                let lo = unpack_legacy_raw(w.get_unchecked(k));
                let hi = if two {
                    unpack_legacy_raw(w.get_unchecked(k + 1))
                } else {
                    _mm256_setzero_si256()
                };
                let v = join(lo, hi);
                if B::KIND == 2 {
                    (v, 0)
                } else {
                    abs_sign(v)
                }
            },
        )
    }

    /// [`super::dot_q8_0`] of one weight row with `N` activation rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_q8_0<const N: usize>(d: &[u16], qs: &[[i8; QK]], x: &[Q8Row; N]) -> [f32; N] {
        rows(
            qs.len(),
            x,
            false,
            |k| *d.get_unchecked(k),
            |_| 0,
            |k, two| {
                let am: __mmask64 = if two { !0 } else { 0xFFFF_FFFF };
                abs_sign(_mm512_maskz_loadu_epi8(am, qs.as_ptr().add(k) as *const i8))
            },
        )
    }

    /// [`super::dot_q4_1`] of one weight row with `N` activation rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_q4_1<const N: usize>(
        d: &[u16],
        m: &[u16],
        qs: &[[u8; QK / 2]],
        x: &[Q8Row; N],
    ) -> [f32; N] {
        rows(
            qs.len(),
            x,
            true,
            |k| *d.get_unchecked(k),
            |k| *m.get_unchecked(k),
            |k, two| {
                let lo = unpack_q4(qs.get_unchecked(k));
                let hi = if two {
                    unpack_q4(qs.get_unchecked(k + 1))
                } else {
                    _mm256_setzero_si256()
                };
                (join(lo, hi), 0)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::lcg;

    fn legacy_case<B: LegacyBlock>(seed: u64) {
        let nb = 13;
        let mut bytes: Vec<u8> = lcg(seed, nb * B::BYTES)
            .iter()
            .map(|v| ((v + 1.0) * 127.99) as u8)
            .collect();
        for (k, c) in bytes.chunks_exact_mut(B::BYTES).enumerate() {
            let d = f16::from_f32(0.01 + 0.001 * k as f32)
                .to_bits()
                .to_le_bytes();
            c[..2].copy_from_slice(&d);
            if B::KIND == 2 {
                let m = f16::from_f32(-0.05 * k as f32).to_bits().to_le_bytes();
                c[2..4].copy_from_slice(&m);
            }
        }
        let w: Vec<B> = bytes.chunks_exact(B::BYTES).map(B::from_bytes).collect();
        let x = lcg(seed + 1, nb * QK);
        let xq = quantize_q8_1(&x, nb * QK);
        let rows = Q8Rows::new(&xq);
        let xr = rows.row(0, nb);
        // Reference: dequantize both sides, f64 dot.
        let mut deq = vec![0f32; nb * QK];
        for (b, o) in w.iter().zip(deq.chunks_exact_mut(QK)) {
            b.dequantize(o);
        }
        let reference: f64 = deq
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f64 * (xq[i / QK].d * xq[i / QK].qs[i % QK] as f32) as f64)
            .sum();
        // Q5_1's offset is dotted through s = f16(d * sum q), not the dequantized d * q.
        let tol = 1e-3 * deq.iter().map(|v| v.abs() as f64).sum::<f64>().max(1.0);
        for simd in [false, true] {
            let ours = dot_legacy(&w, xr, simd) as f64;
            assert!(
                (ours - reference).abs() <= tol,
                "kind {} simd {simd}: {ours} vs {reference}",
                B::KIND
            );
        }
        let (a, b) = (dot_legacy(&w, xr, false), dot_legacy(&w, xr, true));
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "kind {}: scalar {a} vs simd {b}",
            B::KIND
        );
    }

    #[test]
    fn legacy_dots_equal_dequantized_reference() {
        for seed in 0..4 {
            legacy_case::<BlockQ4_0>(seed);
            legacy_case::<BlockQ5_0>(seed + 10);
            legacy_case::<BlockQ5_1>(seed + 20);
        }
    }

    #[test]
    fn quantizer_equals_reference() {
        let x: Vec<f32> = lcg(11, 32 * 40)
            .iter()
            .enumerate()
            .map(|(i, v)| if i < 32 { 0.0 } else { v * (1 + i % 7) as f32 })
            .collect();
        let q = quantize_q8_1(&x, 32 * 40);
        for (xs, b) in x.chunks_exact(QK).zip(&q) {
            let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let qs: Vec<i8> = xs
                .iter()
                .map(|v| (v * id).round_ties_even() as i8)
                .collect();
            assert_eq!(b.qs.to_vec(), qs);
            assert_eq!(b.d, f16::from_f32(d).to_f32());
            let sum: i32 = qs.iter().map(|&v| v as i32).sum();
            assert_eq!(b.s, f16::from_f32(d * sum as f32).to_f32());
        }
    }
    /// Every SIMD path (AVX2 and 512-bit, one and four activation rows) against the scalar one,
    /// for block counts that are and are not multiples of the kernels' groups of 2 and 8.
    #[test]
    fn simd_paths_equal_scalar_one_and_four_rows() {
        fn close(name: &str, want: [f32; 4], got: [f32; 4]) {
            for i in 0..4 {
                assert!(
                    (want[i] - got[i]).abs() <= 1e-5 * want[i].abs().max(1.0),
                    "{name} row {i}: {} vs scalar {}",
                    got[i],
                    want[i]
                );
            }
        }
        fn legacy<B: LegacyBlock>(nb: usize, seed: u64, xr: &[Q8Row; 4]) {
            let bytes: Vec<u8> = lcg(seed, nb * B::BYTES)
                .iter()
                .enumerate()
                .map(|(i, v)| match i % B::BYTES {
                    1 | 3 => 0x20, // f16 scales of moderate size
                    _ => ((v + 1.0) * 127.99) as u8,
                })
                .collect();
            let w: Vec<B> = bytes.chunks_exact(B::BYTES).map(B::from_bytes).collect();
            let want = xr.map(|x| dot_legacy(&w, x, false));
            let name = format!("kind {} nb {nb}", B::KIND);
            close(&name, want, dotn_legacy(&w, xr, true));
            close(&name, want, xr.map(|x| dot_legacy(&w, x, true)));
            #[cfg(target_arch = "x86_64")]
            {
                if cpu().avx2_fma_f16c() {
                    // SAFETY: detected.
                    close(&name, want, unsafe { avx2::dot4_legacy(&w, xr) });
                    close(&name, want, xr.map(|x| unsafe { avx2::dot_legacy(&w, x) }));
                }
                if cpu().avx512() {
                    // SAFETY: detected.
                    close(&name, want, unsafe { avx512::dot_legacy(&w, xr) });
                    close(
                        &name,
                        want,
                        xr.map(|x| unsafe { avx512::dot_legacy(&w, &[x]) }[0]),
                    );
                }
            }
        }
        for nb in [1, 2, 3, 8, 13, 18, 48] {
            let xq: Vec<Vec<BlockQ8_1>> = (0..4)
                .map(|i| quantize_q8_1(&lcg(100 + i + nb as u64, nb * QK), nb * QK))
                .collect();
            let rows: Vec<Q8Rows> = xq.iter().map(|x| Q8Rows::new(x)).collect();
            let xr: [Q8Row; 4] = std::array::from_fn(|i| rows[i].row(0, nb));
            // Eight rows through the dispatch (AVX-512: one pass; AVX2: two fours).
            let x8: [Q8Row; 8] = std::array::from_fn(|i| xr[i % 4]);
            let wq5: Vec<BlockQ5_0> = lcg(40 + nb as u64, nb * BlockQ5_0::BYTES)
                .iter()
                .enumerate()
                .map(|(i, v)| match i % BlockQ5_0::BYTES {
                    1 => 0x20,
                    _ => ((v + 1.0) * 127.99) as u8,
                })
                .collect::<Vec<u8>>()
                .chunks_exact(BlockQ5_0::BYTES)
                .map(BlockQ5_0::from_bytes)
                .collect();
            let want8 = x8.map(|x| dot_legacy(&wq5, x, false));
            let got8 = dotn_legacy(&wq5, &x8, true);
            for i in 0..8 {
                assert!(
                    (want8[i] - got8[i]).abs() <= 1e-5 * want8[i].abs().max(1.0),
                    "q5_0 8 rows nb {nb} row {i}: {} vs scalar {}",
                    got8[i],
                    want8[i]
                );
            }
            legacy::<BlockQ4_0>(nb, 1, &xr);
            legacy::<BlockQ5_0>(nb, 2, &xr);
            legacy::<BlockQ5_1>(nb, 3, &xr);
            // Q8_0 and Q4_1 (struct-of-arrays rows); Q8_0 weights include -127 and 127.
            let d: Vec<u16> = (0..nb)
                .map(|k| f16::from_f32(0.01 + 0.002 * k as f32).to_bits())
                .collect();
            let m: Vec<u16> = (0..nb)
                .map(|k| f16::from_f32(-0.03 * k as f32).to_bits())
                .collect();
            let q8: Vec<[i8; QK]> = (0..nb)
                .map(|k| {
                    let v = lcg(7 + k as u64, QK);
                    std::array::from_fn(|j| (v[j] * 127.0).round().clamp(-127.0, 127.0) as i8)
                })
                .collect();
            let q4: Vec<[u8; QK / 2]> = (0..nb)
                .map(|k| {
                    let v = lcg(9 + k as u64, QK / 2);
                    std::array::from_fn(|j| ((v[j] + 1.0) * 127.99) as u8)
                })
                .collect();
            let want = xr.map(|x| dot_q8_0(&d, &q8, x, false));
            close("q8_0", want, dotn_q8_0(&d, &q8, &xr, true));
            close("q8_0", want, xr.map(|x| dot_q8_0(&d, &q8, x, true)));
            let want4 = xr.map(|x| dot_q4_1(&d, &m, &q4, x, false));
            close("q4_1", want4, dotn_q4_1(&d, &m, &q4, &xr, true));
            close("q4_1", want4, xr.map(|x| dot_q4_1(&d, &m, &q4, x, true)));
            #[cfg(target_arch = "x86_64")]
            {
                if cpu().avx2_fma_f16c() {
                    // SAFETY: detected.
                    unsafe {
                        close("q8_0 avx2", want, avx2::dot4_q8_0_q8_1(&d, &q8, &xr));
                        close("q4_1 avx2", want4, avx2::dot4_q4_1_q8_1(&d, &m, &q4, &xr));
                    }
                }
                if cpu().avx512() {
                    // SAFETY: detected.
                    unsafe {
                        close("q8_0 avx512", want, avx512::dot_q8_0(&d, &q8, &xr));
                        close("q4_1 avx512", want4, avx512::dot_q4_1(&d, &m, &q4, &xr));
                    }
                }
            }
        }
    }
}
