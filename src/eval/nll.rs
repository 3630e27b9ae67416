//! Negative log-likelihood bookkeeping: the NLL of a token from its row of logits, and sums per
//! position bucket.
//!
//! Positions are those of the *predicted* token: the row of position `p − 1` scores the token
//! at `p`, so position 0 (nothing before it) is never scored and a bucket `[a, b)` holds the
//! predictions of tokens `a..b`, each made with exactly `p` tokens of context.

use crate::kernels::fast_exp;

/// `−ln softmax(row)[target]`, with the log-sum-exp taken around the row's maximum (f32 terms,
/// f64 sums: a 150k-entry vocabulary would lose digits in f32).
pub fn token_nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut lanes = [0f64; 8];
    let chunks = row.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| fast_exp(x - max) as f64)
        .sum();
    for c in chunks {
        for l in 0..8 {
            lanes[l] += fast_exp(c[l] - max) as f64;
        }
    }
    let log_sum = (lanes.iter().sum::<f64>() + tail).ln() + max as f64;
    log_sum - row[target as usize] as f64
}

/// Sums of NLL per bucket of predicted positions. Bucket `i` is `[ends[i − 1], ends[i])`, the
/// first starting at 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    ends: Vec<usize>,
    sums: Vec<f64>,
    counts: Vec<usize>,
}

/// One bucket's result.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Bucket {
    /// First predicted position.
    pub start: usize,
    /// One past the last.
    pub end: usize,
    /// Tokens scored (`end − start`, less position 0, less what the run did not reach).
    pub tokens: usize,
    pub mean_nll: f64,
    /// `e^mean_nll`.
    pub ppl: f64,
}

impl Buckets {
    /// Buckets ending at each of `ends` (sorted, increasing).
    pub fn new(ends: &[usize]) -> Self {
        debug_assert!(ends.windows(2).all(|w| w[0] < w[1]));
        Self {
            ends: ends.to_vec(),
            sums: vec![0.0; ends.len()],
            counts: vec![0; ends.len()],
        }
    }

    /// Records the NLL of the token at `position`; positions past the last end are ignored.
    pub fn add(&mut self, position: usize, nll: f64) {
        let i = self.ends.partition_point(|&end| end <= position);
        if i < self.ends.len() {
            self.sums[i] += nll;
            self.counts[i] += 1;
        }
    }

    /// The buckets that received any token.
    pub fn results(&self) -> Vec<Bucket> {
        let mut start = 0;
        let mut out = Vec::new();
        for i in 0..self.ends.len() {
            if self.counts[i] > 0 {
                let mean_nll = self.sums[i] / self.counts[i] as f64;
                out.push(Bucket {
                    start,
                    end: self.ends[i],
                    tokens: self.counts[i],
                    mean_nll,
                    ppl: mean_nll.exp(),
                });
            }
            start = self.ends[i];
        }
        out
    }

    /// Perplexity over every recorded token.
    pub fn overall_ppl(&self) -> Option<f64> {
        let n: usize = self.counts.iter().sum();
        (n > 0).then(|| (self.sums.iter().sum::<f64>() / n as f64).exp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact_nll(row: &[f32], target: usize) -> f64 {
        let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        lse - row[target] as f64
    }

    #[test]
    fn nll_matches_an_exact_log_softmax() {
        // Odd length (a tail after the 8-lane chunks), large values (the max must be removed).
        let row: Vec<f32> = (0..1001)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3 + 20.0)
            .collect();
        for target in [0, 500, 1000] {
            let got = token_nll(&row, target as u32);
            let want = exact_nll(&row, target);
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        // A uniform row: ln(vocab).
        assert!((token_nll(&[3.0; 16], 7) - 16f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn buckets_hold_their_positions_and_skip_the_unscored() {
        let mut b = Buckets::new(&[4, 8, 12]);
        for p in 1..10 {
            b.add(p, p as f64);
        }
        b.add(100, 1e9); // past the last end: ignored
        let r = b.results();
        assert_eq!(r.len(), 3);
        // Position 0 is never scored: bucket [0, 4) has 3 tokens.
        assert_eq!((r[0].start, r[0].end, r[0].tokens), (0, 4, 3));
        assert!((r[0].mean_nll - 2.0).abs() < 1e-12);
        assert_eq!((r[1].start, r[1].end, r[1].tokens), (4, 8, 4));
        assert!((r[1].ppl - 5.5f64.exp()).abs() < 1e-9);
        // The run stopped at 10: the last bucket is partial.
        assert_eq!((r[2].start, r[2].end, r[2].tokens), (8, 12, 2));
        assert!((b.overall_ppl().unwrap() - 5f64.exp()).abs() < 1e-9);
        assert_eq!(Buckets::new(&[4]).overall_ppl(), None);
        // An empty bucket is left out; the next one still starts at its true start.
        let mut b = Buckets::new(&[4, 8, 12]);
        b.add(9, 1.0);
        assert_eq!(b.results()[0].start, 8);
    }
}
