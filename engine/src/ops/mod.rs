//! Kernel launchers. Each module holds one kernel family: the Rust launcher of every entry point, its CPU f64
//! reference (`cpu`), and the GPU-vs-CPU tests, side by side.

pub mod adamw;
pub mod attention;
pub mod classifier;
pub mod elementwise;
pub mod embedding;
pub(crate) mod forced;
pub mod kv_cache;
pub mod loss;
pub mod matmul;
pub mod matmul_tune;
pub mod norm;
pub mod policy;
pub mod probe;
pub mod reduce;
pub mod rope;
pub mod sampling;
#[cfg(test)]
mod split_tests;

use crate::{Error, Result, Tensor};

/// Threads per workgroup of the 1-D elementwise kernels (matches `WG` in the WGSL).
pub(crate) const WG_1D: u32 = 256;

/// One field of a launcher's immediates struct: name, byte offset, byte size.
#[cfg(test)]
pub(crate) type Field = (&'static str, usize, usize);

#[cfg(test)]
pub(crate) fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    std::mem::size_of::<F>()
}

/// The [`Field`]s of a struct, from the compiler's own layout.
#[cfg(test)]
#[macro_export]
macro_rules! layout_of {
    ($t:ident { $($f:ident),* $(,)? }) => {
        vec![$((stringify!($f), std::mem::offset_of!($t, $f), $crate::ops::field_size(|p: &$t| &p.$f))),*]
    };
}

/// A 1-D launch of `n` items folded into x/y: one grid dimension allows at most 65535 workgroups on most adapters.
pub(crate) fn grid_1d(n: usize, wg: u32) -> [u32; 3] {
    let groups = (n as u64).div_ceil(wg as u64);
    let x = groups.min(65535);
    [x as u32, groups.div_ceil(x.max(1)) as u32, 1]
}

pub(crate) fn nonempty(op: &'static str, what: &'static str, t: &Tensor) -> Result<()> {
    if t.numel() == 0 {
        return Err(Error::Empty { op, what, shape: t.shape().to_vec() });
    }
    Ok(())
}

pub(crate) fn same_shape(op: &'static str, what: &'static str, expected: &Tensor, got: &Tensor) -> Result<()> {
    if expected.shape() != got.shape() {
        return Err(Error::Shape {
            op,
            what,
            expected: format!("{:?}", expected.shape()),
            got: format!("{:?}", got.shape()),
        });
    }
    Ok(())
}

pub(crate) fn shape_is(op: &'static str, what: &'static str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.shape() != expected {
        return Err(Error::Shape { op, what, expected: format!("{expected:?}"), got: format!("{:?}", t.shape()) });
    }
    Ok(())
}

/// Elements that fit in u32 indexing inside the kernels.
pub(crate) fn fits_u32(op: &'static str, what: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n)
        .map_err(|_| Error::Invalid { op, message: format!("{what} has {n} elements; kernels index with u32") })
}
