//! Next-token sampling: repeat penalty, then temperature, top-k, top-p and min-p, as llama.cpp
//! orders them. Temperature 0 is greedy (argmax after the penalty).

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

mod device;

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
    #[error("sampling on the device failed: {0}")]
    Device(String),
}

impl SamplingError {
    fn device(e: candle_core::Error) -> Self {
        Self::Device(crate::error::candle_msg(&e))
    }
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
            for id in recent_tokens(history, p.repeat_last_n) {
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

impl Sampler {
    /// Picks the next token from a logits row `[vocab]` where it lies: a CPU row goes through
    /// [`Self::sample`]; a GPU row is sampled there ([`Self::sample_on_device`]), so only the id
    /// crosses to the host.
    pub fn sample_tensor(
        &mut self,
        logits: &Tensor,
        history: &[u32],
    ) -> Result<u32, SamplingError> {
        if logits.device().is_cpu() {
            let mut row = logits
                .flatten_all()
                .and_then(|l| l.to_dtype(DType::F32))
                .and_then(|l| l.to_vec1::<f32>())
                .map_err(SamplingError::device)?;
            self.sample(&mut row, history)
        } else {
            self.sample_on_device(logits, history)
        }
    }

    /// The same rules as [`Self::sample`] in tensor operations on the logits' own device
    /// (see `device.rs` for how it differs: ties with the k-th logit, the order of the draw).
    pub fn sample_on_device(
        &mut self,
        logits: &Tensor,
        history: &[u32],
    ) -> Result<u32, SamplingError> {
        let p = &self.params;
        let recent = if p.repeat_penalty != 1.0 {
            recent_tokens(history, p.repeat_last_n)
        } else {
            Vec::new()
        };
        let u = self.rng.random_range(0.0f32..1.0);
        device::sample(logits, &self.params, &recent, u)
    }
}

/// The distinct tokens among the last `n` of `history`: what the repeat penalty applies to.
fn recent_tokens(history: &[u32], n: usize) -> Vec<u32> {
    let start = history.len().saturating_sub(n);
    let mut recent = history[start..].to_vec();
    recent.sort_unstable();
    recent.dedup();
    recent
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

    /// The device sampler (on the test device) follows the host sampler's rules: the same
    /// greedy pick after the penalty, the same distribution under temperature, top-k, top-p,
    /// min-p and penalty, nothing outside what they keep, and a seed reproduces its draws.
    #[test]
    fn the_device_sampler_draws_like_the_host_sampler() {
        let device = crate::device::test_device();
        let logits = [
            2.0,
            1.5,
            1.4,
            1.0,
            0.5,
            0.0,
            -0.5,
            f32::NAN,
            -3.0,
            0.9,
            1.6,
            -1.0,
        ];
        let row = Tensor::new(&logits, &device).unwrap();
        let history = [1u32, 10, 10];
        let mut greedy = sampler(|p| {
            p.temperature = 0.0;
            p.repeat_penalty = 1.3;
        });
        // The penalty lowers tokens 1 and 10; token 0 stays the best.
        assert_eq!(greedy.sample_on_device(&row, &history).unwrap(), 0);
        let mut greedy = sampler(|p| {
            p.temperature = 0.0;
            p.repeat_penalty = 2.0;
        });
        assert_eq!(
            greedy.sample_on_device(&row, &[0]).unwrap(),
            greedy.sample(&mut logits.clone(), &[0]).unwrap()
        );
        // Each rule set has one cut that binds: top-k, then top-p, then min-p.
        let rule_sets: [(usize, f32, f32); 3] = [(3, 1.0, 0.0), (6, 0.9, 0.0), (0, 1.0, 0.3)];
        let rules = |(top_k, top_p, min_p): (usize, f32, f32)| {
            move |p: &mut SamplingParams| {
                p.temperature = 0.8;
                p.top_k = top_k;
                p.top_p = top_p;
                p.min_p = min_p;
                p.repeat_penalty = 1.3;
            }
        };
        let n = 6000;
        let frequencies = |set, on_device: bool| {
            let mut s = sampler(rules(set));
            let mut counts = [0usize; 12];
            for _ in 0..n {
                let id = if on_device {
                    s.sample_on_device(&row, &history).unwrap()
                } else {
                    s.sample(&mut logits.clone(), &history).unwrap()
                };
                counts[id as usize] += 1;
            }
            counts.map(|c| c as f64 / n as f64)
        };
        for set in rule_sets {
            let (host, dev) = (frequencies(set, false), frequencies(set, true));
            for (id, (h, d)) in host.iter().zip(&dev).enumerate() {
                assert!(
                    (h - d).abs() < 0.03,
                    "{set:?} token {id}: host {h:.3}, device {d:.3}"
                );
                if *h == 0.0 {
                    assert_eq!(
                        *d, 0.0,
                        "{set:?}: token {id} is cut on the host, not on the device"
                    );
                }
            }
        }
        let draws = |seed| {
            let mut s = sampler(|p| {
                rules(rule_sets[1])(p);
                p.seed = seed;
            });
            (0..50)
                .map(|_| s.sample_on_device(&row, &history).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(3), draws(3));
        assert_ne!(draws(3), draws(4));
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
