//! Typed errors of the engine. Every message names the op and, for limits, the adapter, so a user can act on it.

/// Everything the engine can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no GPU adapter found ({detail}). Fix: install your GPU's Vulkan, Metal or DX12 driver; on Linux without a GPU \
         run `tools/setup.sh` (it installs Mesa lavapipe, a software Vulkan GPU: `apt-get install mesa-vulkan-drivers \
         libvulkan1`)"
    )]
    NoAdapter { detail: String },

    #[error("no adapter name contains KILN_ADAPTER={wanted:?}; available adapters: {available}")]
    AdapterNotFound { wanted: String, available: String },

    #[error("could not open a device on adapter {adapter}: {reason}")]
    Device { adapter: String, reason: String },

    #[error("adapter {adapter} lacks the feature {feature}, which Kiln needs ({why})")]
    MissingFeature { adapter: String, feature: &'static str, why: &'static str },

    #[error("{op}: shape mismatch for {what}: expected {expected}, got {got}")]
    Shape { op: &'static str, what: &'static str, expected: String, got: String },

    #[error("{op}: {what} is empty (shape {shape:?}); every dimension must be at least 1")]
    Empty { op: &'static str, what: &'static str, shape: Vec<usize> },

    #[error("{op}: {what} is {dtype_got:?}, expected {dtype_expected:?}")]
    DType { op: &'static str, what: &'static str, dtype_expected: crate::DType, dtype_got: crate::DType },

    #[error(
        "{op}: {what} needs {needed}, but adapter {adapter} allows at most {limit} ({limit_name}); use smaller \
         shapes or a device with larger limits"
    )]
    Limit { op: &'static str, what: &'static str, needed: u64, limit: u64, limit_name: &'static str, adapter: String },

    #[error("{op}: invalid argument: {message}")]
    Invalid { op: &'static str, message: String },

    #[error("GPU reported an error ({context}): {message}")]
    Gpu { context: &'static str, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;
