//! `--device auto|cpu|cuda[:N]|metal`. This build computes on the CPU only: the Λ cache and its
//! kernels are CPU code, and candle is built without its `cuda`/`metal` features. Asking for a
//! GPU is therefore a clear error rather than a silent fallback; `auto` means the CPU.

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
        "--device {0}: this build of lambdachat computes on the CPU only (GPU support is not \
         implemented yet); use --device cpu"
    )]
    NotBuilt(String),
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
    /// The device to compute on.
    pub fn select(self) -> Result<candle_core::Device, DeviceError> {
        match self {
            Self::Auto | Self::Cpu => Ok(candle_core::Device::Cpu),
            gpu => Err(DeviceError::NotBuilt(gpu.to_string())),
        }
    }
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
        assert!(DeviceChoice::Auto.select().unwrap().is_cpu());
        assert!(DeviceChoice::Cpu.select().unwrap().is_cpu());
        let e = DeviceChoice::Metal.select().unwrap_err().to_string();
        assert!(e.contains("CPU only"), "{e}");
    }
}
