//! Next-token sampling: repeat penalty, then temperature, top-k, top-p and min-p, as llama.cpp
//! orders them. Temperature 0 is greedy (argmax after the penalty).

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// 1.0 disables the penalty.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 0x1a3bda,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    #[error("temperature must be a finite number ≥ 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("min_p must be in [0, 1), got {0}")]
    MinP(f32),
    #[error("repeat_penalty must be a finite number > 0, got {0}")]
    RepeatPenalty(f32),
    #[error("the model produced no logits")]
    Empty,
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(self.min_p >= 0.0 && self.min_p < 1.0) {
            return Err(SamplingError::MinP(self.min_p));
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return Err(SamplingError::RepeatPenalty(self.repeat_penalty));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (modified in place), given the tokens generated so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> Result<u32, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::Empty);
        }
        let p = &self.params;
        if p.repeat_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut recent: Vec<u32> = history[start..].to_vec();
            recent.sort_unstable();
            recent.dedup();
            for id in recent {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, l)| (i as u32, *l))
            .collect();
        if cands.is_empty() {
            return Err(SamplingError::Empty);
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, by_logit);
            cands.truncate(p.top_k);
        }
        cands.sort_unstable_by(by_logit);
        let max = cands[0].1;
        let mut probs: Vec<f32> = cands
            .iter()
            .map(|(_, l)| ((l - max) / p.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        // top-p: the smallest prefix whose mass reaches top_p; min-p: drop tokens far below the best.
        let mut keep = probs.len();
        let mut mass = 0.0;
        for (i, pr) in probs.iter().enumerate() {
            mass += pr;
            if mass >= p.top_p {
                keep = i + 1;
                break;
            }
        }
        let floor = p.min_p * probs[0];
        keep = keep.min(probs.iter().take_while(|x| **x >= floor).count().max(1));
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random_range(0.0..total.max(f32::MIN_POSITIVE));
        for (i, pr) in probs[..keep].iter().enumerate() {
            if r < *pr {
                return Ok(cands[i].0);
            }
            r -= pr;
        }
        Ok(cands[keep - 1].0)
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
        let mut p = SamplingParams::default();
        f(&mut p);
        Sampler::new(p).unwrap()
    }

    #[test]
    fn greedy_takes_argmax_after_penalty() {
        let mut s = sampler(|p| p.temperature = 0.0);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[]).unwrap(), 1);
        let mut s = sampler(|p| {
            p.temperature = 0.0;
            p.repeat_penalty = 1.5;
        });
        // 3.0 / 1.5 = 2.0 < 2.9
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9], &[1]).unwrap(), 2);
    }

    #[test]
    fn top_k_one_is_deterministic() {
        let mut s = sampler(|p| {
            p.top_k = 1;
            p.temperature = 5.0;
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5, 0.9], &[]).unwrap(), 1);
        }
    }

    #[test]
    fn min_p_removes_unlikely_tokens() {
        let mut s = sampler(|p| {
            p.top_k = 0;
            p.top_p = 1.0;
            p.min_p = 0.5;
            p.temperature = 1.0;
        });
        // Token 2 has probability e^-3 relative to the best: always cut.
        for _ in 0..200 {
            let id = s.sample(&mut [0.0, 0.0, -3.0], &[]).unwrap();
            assert_ne!(id, 2);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let draw = |seed| {
            let mut s = sampler(|p| {
                p.seed = seed;
                p.top_k = 0;
                p.top_p = 1.0;
                p.min_p = 0.0;
                p.temperature = 1.0;
                p.repeat_penalty = 1.0;
            });
            (0..2000)
                .map(|_| s.sample(&mut [0.0, (3f32).ln()], &[]).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        let ones = a.iter().filter(|x| **x == 1).count() as f32 / 2000.0;
        assert!((ones - 0.75).abs() < 0.04, "{ones}");
    }

    #[test]
    fn invalid_parameters_are_named() {
        let bad = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            p.validate().unwrap_err().to_string()
        };
        assert!(bad(|p| p.temperature = -1.0).contains("temperature"));
        assert!(bad(|p| p.top_p = 0.0).contains("top_p"));
        assert!(bad(|p| p.min_p = 1.0).contains("min_p"));
        assert!(bad(|p| p.repeat_penalty = 0.0).contains("repeat_penalty"));
    }
}
