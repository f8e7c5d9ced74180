//! kiln-engine: the GPU runtime of Kiln. A `Gpu` context over wgpu (any vendor), pooled tensors, cached pipelines,
//! and the WGSL kernels with their CPU f64 references (`ops`).

pub mod autograd;
mod error;
mod gpu;
mod launch;
pub mod ops;
mod pool;
mod profiler;
mod readback;
pub mod selfcheck;
pub mod shaders;
mod tensor;
pub mod testing;

#[cfg(test)]
mod params_layout_tests;

pub use error::{Error, Result};
pub use gpu::{list_adapters, AdapterReport, Gpu};
pub use launch::Launch;
pub use pool::{MemoryKind, MemorySplit, PoolStats};
pub use profiler::KernelTime;
pub use readback::{PendingRead, Readback};
pub use tensor::{DType, Tensor};
