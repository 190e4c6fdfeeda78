//! Element-wise f32 math of the fused encoder path: exp, erf and GELU as branch-free polynomials
//! that vectorise in the AVX2 copies of their callers (and give the same values in the scalar ones:
//! no reassociation, no FMA contraction).

/// erf for f32 as a rational approximation (Eigen / XLA `generic_fast_erf_float`), a few ulp
/// from the exact value; branch-free so it vectorises.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_474e-2;
    p / q
}

/// e^x for f32 (Cephes `expf`: x = n ln 2 + r, a degree-6 polynomial in r, times 2^n), within
/// 2 ulp; branch-free so it vectorises. Arguments below -87 give 0 (softmax of masked-out gaps).
#[inline(always)]
pub fn exp(x_in: f32) -> f32 {
    let x = x_in.clamp(-87.0, 88.0);
    // Round to nearest by adding and removing 1.5 * 2^23 (no libm call, so it vectorises).
    const SHIFTER: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_66;
    p = p * r + 0.5;
    p = p * r * r + r + 1.0;
    // 2^n from the shifted sum's low bits, which hold n: integer lanes, no float-to-int
    // conversion (whose saturating semantics do not vectorise).
    let two_n = shifted
        .to_bits()
        .wrapping_sub(SHIFTER.to_bits())
        .wrapping_add(127)
        << 23;
    let e = p * f32::from_bits(two_n);
    if x_in < -87.0 {
        0.0
    } else {
        e
    }
}

/// `x = gelu_erf(x + b)` elementwise (`b` at least as long as `x`); runs in the products'
/// epilogues, vectorised there.
#[inline(always)]
pub fn gelu_in_place(x: &mut [f32], b: &[f32]) {
    for (x, b) in x.iter_mut().zip(b) {
        let v = *x + b;
        *x = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Result;
    use candle_core::{Device, Tensor};

    #[test]
    fn fused_erf_matches_candle_erf() -> Result<()> {
        let xs: Vec<f32> = (-8000..=8000).map(|i| i as f32 * 1e-3).collect();
        let exact = Tensor::new(xs.as_slice(), &Device::Cpu)?
            .erf()?
            .to_vec1::<f32>()?;
        for (x, e) in xs.iter().zip(&exact) {
            let got = erf(*x);
            assert!((got - e).abs() < 2e-6, "erf({x}) = {got}, candle {e}");
        }
        Ok(())
    }

    #[test]
    fn fused_exp_matches_std_exp() {
        for i in -8700..=8800 {
            let x = i as f32 * 1e-2;
            let (got, want) = (exp(x), x.exp());
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON * want,
                "exp({x}) = {got}, std {want}"
            );
        }
        assert_eq!(exp(-87.5), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }
}
