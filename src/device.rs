//! `--device auto|cpu|cuda[:N]|metal`. GPUs come from candle's backends, compiled in only by
//! lambdachat's `cuda` / `metal` cargo features; in a build without them a GPU device is a clear
//! error, and `auto` is the CPU. With them, the weights, the model's matrix products, the Λ
//! cache ([`crate::attention::TensorCache`]) and sampling run on the GPU: a decode step sends the
//! token id up and brings the sampled id back, nothing else.

use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("unknown device '{0}': use auto, cpu, cuda, cuda:N or metal")]
    Unknown(String),
    #[error(
        "--device {0}: this lambdachat was built without {1} support (build it with \
         `--features {1}`), or use --device cpu"
    )]
    NotBuilt(String, &'static str),
    #[error("--device {0}: {1}")]
    Unavailable(String, String),
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || DeviceError::Unknown(s.to_string());
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "metal" => Ok(Self::Metal),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(unknown),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => write!(f, "metal"),
        }
    }
}

impl DeviceChoice {
    /// The device to compute on. `auto` takes the first GPU of a GPU build when one is there,
    /// else the CPU (saying so in the log).
    pub fn select(self) -> Result<candle_core::Device, DeviceError> {
        use candle_core::utils::{cuda_is_available, metal_is_available};
        let unavailable = |e: candle_core::Error| {
            DeviceError::Unavailable(self.to_string(), crate::error::candle_msg(&e))
        };
        match self {
            Self::Cpu => Ok(candle_core::Device::Cpu),
            Self::Cuda(n) if cuda_is_available() => {
                candle_core::Device::new_cuda(n).map_err(unavailable)
            }
            Self::Metal if metal_is_available() => {
                candle_core::Device::new_metal(0).map_err(unavailable)
            }
            Self::Cuda(_) => Err(DeviceError::NotBuilt(self.to_string(), "cuda")),
            Self::Metal => Err(DeviceError::NotBuilt(self.to_string(), "metal")),
            Self::Auto => {
                let gpu = if cuda_is_available() {
                    Self::Cuda(0).select().ok()
                } else if metal_is_available() {
                    Self::Metal.select().ok()
                } else {
                    None
                };
                if gpu.is_none() {
                    tracing::info!(
                        "--device auto: no usable GPU in this build; computing on the CPU"
                    );
                }
                Ok(gpu.unwrap_or(candle_core::Device::Cpu))
            }
        }
    }
}

/// The device the tests run the tensor paths on: `$LAMBDACHAT_TEST_DEVICE` (`cuda`, `metal`, …),
/// else the CPU. The GPU check runs the same tests there. Public for the integration tests; it
/// panics on a bad value, which only a test run sets.
#[doc(hidden)]
pub fn test_device() -> candle_core::Device {
    std::env::var("LAMBDACHAT_TEST_DEVICE").map_or(candle_core::Device::Cpu, |d| {
        let choice: DeviceChoice = d.parse().expect("LAMBDACHAT_TEST_DEVICE");
        choice.select().expect("LAMBDACHAT_TEST_DEVICE")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_refuses_gpus_in_a_cpu_build() {
        assert_eq!("cuda:1".parse(), Ok(DeviceChoice::Cuda(1)));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert!("tpu".parse::<DeviceChoice>().is_err());
        if !candle_core::utils::cuda_is_available() && !candle_core::utils::metal_is_available() {
            assert!(DeviceChoice::Auto.select().unwrap().is_cpu());
        }
        assert!(DeviceChoice::Cpu.select().unwrap().is_cpu());
        let e = DeviceChoice::Metal.select().unwrap_err().to_string();
        assert!(e.contains("built without metal support"), "{e}");
    }
}
