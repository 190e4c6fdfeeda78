//! Hand-written CPU kernels, apart from the models that call them:
//! - [`dot`]: f32 (and f16-row) dot products, prefetch;
//! - [`packed`]: f32 GEMM on weights packed into 16-column panels (6 × 16 AVX2/FMA microkernel);
//! - [`int8`]: dynamic int8 GEMM (u8 activations × 7-bit weights, exact i32 sums);
//! - [`q8`]: GGUF Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 weight blocks × Q8_1 activations, and the Q8_1
//!   quantiser; [`kquant`]: Q4_K / Q5_K / Q6_K super-blocks × Q8_K activations;
//! - [`int16`]: i16 code dots of the exact-search first pass;
//! - [`math`]: exp, erf, GELU; [`fused`]: the BERT layer's fused LayerNorm, q/k/v split, masked
//!   softmax and attention; [`attention`]: single-query softmax attention over a raw KV cache.
//!
//! Every kernel has a portable scalar path and, on x86_64, an AVX2 path chosen by the one cached
//! feature check [`cpu`]; the GGUF quantised dots also have 512-bit paths (AVX-512 F/BW/VL/VNNI,
//! [`Cpu::avx512`]). `RUSTRAG_FORCE_SCALAR=1` (read once, at the first kernel call) makes
//! every kernel take its scalar path, as on CPUs without AVX2 (ARM: Apple Silicon, Graviton);
//! CI runs the parity suite and the model tests that way too. candle's own ops (the training
//! path, the tensor forward of the generators) keep their own dispatch.

/// `fn $name(args)` that runs the `#[inline(always)]` kernel `$body(args)` compiled for
/// AVX2 + FMA when the CPU has them (its loops then vectorise 8 wide), else as built. The body
/// must be a named function: a closure is not reliably inlined into the AVX2 copy.
macro_rules! avx2_dispatch {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $body:ident) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if $crate::kernels::cpu().avx2_fma() {
                    // SAFETY: the features were detected.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub mod attention;
pub mod dot;
pub mod fused;
pub mod int16;
pub mod int8;
pub mod kquant;
pub mod math;
pub mod packed;
pub mod q8;

use std::sync::OnceLock;

/// The environment switch that forces the scalar kernels.
pub const FORCE_SCALAR_ENV: &str = "RUSTRAG_FORCE_SCALAR";

/// The instruction-set extensions the kernels use, detected once. All false when the CPU is not
/// x86_64 or when [`FORCE_SCALAR_ENV`] is set to anything but `0` or empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpu {
    pub avx2: bool,
    pub fma: bool,
    pub f16c: bool,
    /// AVX-512 F + BW + VL + VNNI (the 512-bit quantised dot kernels).
    pub avx512: bool,
    /// The scalar paths were forced by [`FORCE_SCALAR_ENV`].
    pub forced_scalar: bool,
}

impl Cpu {
    fn detect() -> Self {
        Self::detect_with(std::env::var(FORCE_SCALAR_ENV).ok().as_deref())
    }

    /// Detection given the value of [`FORCE_SCALAR_ENV`] (None: unset).
    fn detect_with(force_scalar: Option<&str>) -> Self {
        if force_scalar.is_some_and(|v| !v.is_empty() && v != "0") {
            return Self {
                forced_scalar: true,
                ..Self::default()
            };
        }
        #[cfg(target_arch = "x86_64")]
        {
            Self {
                avx2: is_x86_feature_detected!("avx2"),
                fma: is_x86_feature_detected!("fma"),
                f16c: is_x86_feature_detected!("f16c"),
                avx512: is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni"),
                forced_scalar: false,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Self::default()
    }

    /// AVX2 integer lanes (int8 GEMM, i16 code dots).
    #[inline]
    pub fn avx2(&self) -> bool {
        self.avx2
    }

    /// AVX2 + FMA (f32 GEMM, vectorised element-wise kernels).
    #[inline]
    pub fn avx2_fma(&self) -> bool {
        self.avx2 && self.fma
    }

    /// AVX2 + FMA + F16C (f32/f16 dots, GGUF quantised dots).
    #[inline]
    pub fn avx2_fma_f16c(&self) -> bool {
        self.avx2 && self.fma && self.f16c
    }

    /// AVX2 + FMA + F16C and AVX-512 F/BW/VL/VNNI (512-bit GGUF quantised dots).
    #[inline]
    pub fn avx512(&self) -> bool {
        self.avx512 && self.avx2_fma_f16c()
    }

    /// A short name of the path the kernels take, for logs and benchmark reports.
    pub fn describe(&self) -> &'static str {
        if self.forced_scalar {
            "scalar (forced by RUSTRAG_FORCE_SCALAR)"
        } else if self.avx512() {
            "avx512(f,bw,vl,vnni)+avx2+fma+f16c"
        } else if self.avx2_fma_f16c() {
            "avx2+fma+f16c"
        } else if self.avx2 {
            "avx2"
        } else {
            "scalar"
        }
    }
}

/// The CPU features every kernel dispatches on (detected once per process).
#[inline]
pub fn cpu() -> &'static Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    CPU.get_or_init(|| {
        let cpu = Cpu::detect();
        tracing::debug!("kernels: {}", cpu.describe());
        cpu
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn force_scalar_switch_turns_every_feature_off() {
        for v in ["1", "yes"] {
            let c = Cpu::detect_with(Some(v));
            assert!(
                c.forced_scalar && !c.avx2() && !c.avx2_fma() && !c.avx2_fma_f16c() && !c.avx512()
            );
        }
        for v in [None, Some(""), Some("0")] {
            let c = Cpu::detect_with(v);
            assert!(!c.forced_scalar);
            #[cfg(target_arch = "x86_64")]
            assert_eq!(c.avx2, is_x86_feature_detected!("avx2"));
        }
        // The process-wide check agrees with the environment this test runs in.
        assert_eq!(cpu(), &Cpu::detect());
    }
}
