//! A vectorizable exponential for softmax-like loops (attention scores, log-likelihoods).

/// `e^x` for `x ≤ 0`, branch-free so loops over it vectorize: `n = round(x / ln 2)` by the
/// 1.5·2²³ trick, `r = x − n·ln 2` with ln 2 split in two (Cody–Waite, so `r` stays exact), `e^r`
/// (|r| ≤ ½ ln 2) from a degree-7 Taylor polynomial, times `2^n` built in the exponent bits.
/// Only multiplications, additions and integer operations, so a loop runs it in vectors.
/// Relative error below 5e-7. Inputs below −87.3 give the smallest normal float, not 0; the
/// caller maps −∞ (masked) to exactly 0.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375: few mantissa bits, n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.max(-87.33);
    // `shifted`'s low mantissa bits hold n in two's complement (|n| < 2²²).
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2ⁿ's exponent field from those bits: the shift drops the rest of `shifted`. Not
    // `n as i32`, whose saturating conversion does not vectorize.
    let bits = shifted.to_bits().wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_on_the_softmax_range() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x <= 0.0 {
            let exact = (x as f64).exp();
            let rel = ((fast_exp(x) as f64 - exact) / exact).abs();
            worst = worst.max(rel);
            x += 0.001;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(-1000.0) < 1e-37);
    }
}
