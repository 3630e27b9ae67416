//! Rotary position embedding (RoPE) with exact phases at any position.
//!
//! Angles are `pos · inv_freq` computed in f64 and reduced mod 2π before the cast to f32: an f32
//! product loses the phase long before a conversation reaches 100M tokens, and a chat that never
//! ends must not drift. Rotation is applied once per key (at insertion into the cache) and once per
//! query, never re-applied to stored keys.

use std::f64::consts::TAU;

/// How the two halves of a rotated pair are laid out in a head vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(x[i], x[i + d/2])`: Qwen2, Gemma, Phi (HF "rotate_half").
    Neox,
    /// Pairs `(x[2i], x[2i + 1])`: GGUF llama/mistral (weights permuted by the converter).
    Interleaved,
}

/// The rotary embedding of one attention layer.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    style: RopeStyle,
}

impl Rope {
    /// Standard RoPE: `inv_freq[i] = theta^(-2i/d)` over the whole head.
    pub fn new(head_dim: usize, theta: f64, style: RopeStyle) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
            .collect();
        Self { inv_freq, style }
    }

    /// Every frequency divided by its own factor (Llama 3's `rope_freqs`, Phi-3's LongRoPE
    /// factors).
    pub fn divided_by(mut self, divisors: &[f64]) -> Self {
        for (f, d) in self.inv_freq.iter_mut().zip(divisors) {
            *f /= d;
        }
        self
    }

    /// Linear position scaling (Gemma 3 global layers): every frequency divided by `factor`.
    pub fn scaled_linear(mut self, factor: f64) -> Self {
        for f in &mut self.inv_freq {
            *f /= factor;
        }
        self
    }

    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    pub fn style(&self) -> RopeStyle {
        self.style
    }

    /// Number of rotated pairs (head_dim / 2).
    pub fn half_dim(&self) -> usize {
        self.inv_freq.len()
    }

    /// Writes cos/sin of every pair's angle at `pos` (exact phase, see module doc).
    pub fn angles(&self, pos: u64, cos: &mut [f32], sin: &mut [f32]) {
        for (i, f) in self.inv_freq.iter().enumerate() {
            let angle = (pos as f64 * f).rem_euclid(TAU);
            cos[i] = angle.cos() as f32;
            sin[i] = angle.sin() as f32;
        }
    }

    /// Rotates one head vector in place with precomputed cos/sin.
    pub fn rotate(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = self.half_dim();
        match self.style {
            RopeStyle::Neox => {
                let (a, b) = x.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * cos[i] - x1 * sin[i];
                    b[i] = x0 * sin[i] + x1 * cos[i];
                }
            }
            RopeStyle::Interleaved => {
                for i in 0..half {
                    let (x0, x1) = (x[2 * i], x[2 * i + 1]);
                    x[2 * i] = x0 * cos[i] - x1 * sin[i];
                    x[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }

    /// Rotates every head vector of `n` rows (`heads` heads of `head_dim` each), row `r` at
    /// position `positions(r)`.
    pub fn rotate_rows(
        &self,
        x: &mut [f32],
        heads: usize,
        head_dim: usize,
        positions: impl Fn(usize) -> u64,
    ) {
        self.turn_rows(x, heads, head_dim, positions, 1.0);
    }

    /// The inverse of [`Self::rotate_rows`]: turns keys rotated to their positions back into
    /// unrotated keys (pinning a token that already sits, rotated, in the window).
    pub fn unrotate_rows(
        &self,
        x: &mut [f32],
        heads: usize,
        head_dim: usize,
        positions: impl Fn(usize) -> u64,
    ) {
        self.turn_rows(x, heads, head_dim, positions, -1.0);
    }

    /// Rotation by `direction` (1 forward, −1 back) times each row's angles.
    fn turn_rows(
        &self,
        x: &mut [f32],
        heads: usize,
        head_dim: usize,
        positions: impl Fn(usize) -> u64,
        direction: f32,
    ) {
        let half = self.half_dim();
        let mut cos = vec![0f32; half];
        let mut sin = vec![0f32; half];
        for (r, row) in x.chunks_mut(heads * head_dim).enumerate() {
            self.angles(positions(r), &mut cos, &mut sin);
            sin.iter_mut().for_each(|s| *s *= direction);
            for head in row.chunks_mut(head_dim) {
                self.rotate(head, &cos, &sin);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn unrotate_undoes_rotate_far_out() {
        for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
            let rope = Rope::new(8, 10_000.0, style);
            let x: Vec<f32> = (0..16).map(|i| i as f32 * 0.37 - 2.0).collect();
            let mut y = x.clone();
            let at = |r: usize| 3_000_000_000 + r as u64 * 7;
            rope.rotate_rows(&mut y, 1, 8, at);
            assert!(y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 0.1));
            rope.unrotate_rows(&mut y, 1, 8, at);
            let err = y
                .iter()
                .zip(&x)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "{style:?}: {err}");
        }
    }

    #[test]
    fn position_zero_is_identity() {
        for style in [RopeStyle::Neox, RopeStyle::Interleaved] {
            let rope = Rope::new(8, 10_000.0, style);
            let mut x: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
            let orig = x.clone();
            rope.rotate_rows(&mut x, 1, 8, |_| 0);
            assert_eq!(x, orig);
        }
    }

    #[test]
    fn dot_product_depends_only_on_distance_even_past_2_pow_32() {
        let rope = Rope::new(16, 1_000_000.0, RopeStyle::Neox);
        let q: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let k: Vec<f32> = (0..16).map(|i| (i as f32 * 0.11).cos()).collect();
        let score = |i: u64, j: u64| {
            let (mut q, mut k) = (q.clone(), k.clone());
            rope.rotate_rows(&mut q, 1, 16, |_| i);
            rope.rotate_rows(&mut k, 1, 16, |_| j);
            dot(&q, &k)
        };
        let near = score(1000, 990);
        let far = score((1 << 33) + 1000, (1 << 33) + 990);
        assert!((near - far).abs() < 1e-4, "{near} vs {far}");
        assert!((score(10, 10) - dot(&q, &k)).abs() < 1e-5);
    }

    #[test]
    fn rotation_preserves_norm() {
        let rope = Rope::new(64, 10_000.0, RopeStyle::Interleaved);
        let mut x: Vec<f32> = (0..64).map(|i| (i as f32).sqrt()).collect();
        let n0 = dot(&x, &x);
        rope.rotate_rows(&mut x, 1, 64, |_| 123_456_789);
        assert!((dot(&x, &x) - n0).abs() / n0 < 1e-5);
    }
}
