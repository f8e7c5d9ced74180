//! The key/value cache of generation: per layer, k and v of every past position, so that each new token attends to
//! the whole prefix without recomputing it. Appending takes the packed qkv the qkv projection produces; attention
//! reads the new queries from that same qkv and the keys from the cache, flash style like [`attention_forward`].
//! Under grouped-query attention the cache holds only the n_kv_head key/value heads.
//!
//! [`attention_forward`]: crate::ops::attention::attention_forward

use std::ops::Range;

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::attention::{Heads, MAX_HEAD_SIZE};
use crate::ops::elementwise::fill;
use crate::ops::{fits_u32, grid_1d, nonempty, shape_is, WG_1D};
use crate::shaders::ATTENTION_CACHED;
use crate::{DType, Error, Gpu, Result, Tensor};

/// Query rows per workgroup of the many-query kernel (the `BR` override).
pub(crate) const BR: u32 = 64;
/// vec4s per staged K (and V) block and the most keys per block (`TILE4`, `MAX_BC` in the WGSL).
const TILE4: usize = 512;
const MAX_BC: usize = 64;
/// Up to this many new tokens, each query gets a workgroup whose invocations split the keys (decode); beyond it,
/// workgroups of BR queries share staged key blocks (prefill).
const SPLIT_MAX_ROWS: usize = 8;

/// The immediates of every entry point of attention_cached.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    b: u32,
    t: u32,
    c: u32,
    nh: u32,
    hs: u32,
    pos: u32,
    tmax: u32,
    bc: u32,
    scale: f32,
    src: u32,
    dst0: u32,
    dst1: u32,
    len: u32,
    nkv: u32,
    w: u32,
}

/// Field names, offsets and sizes of [`Params`], for the test that holds them against the WGSL struct.
#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { b, t, c, nh, hs, pos, tmax, bc, scale, src, dst0, dst1, len, nkv, w })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

/// Per-layer cache: k and v as [B, NKV, Tmax, HS] f32 tensors (head-major so a decode step reads contiguous keys;
/// NKV = n_kv_head, which is n_head for multi-head attention).
pub struct KvCache {
    pub k: Tensor,
    pub v: Tensor,
    pub batch: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_size: usize,
    pub max_len: usize,
}

impl KvCache {
    /// A zeroed cache for `heads` (an n_head, or [`Heads`] with fewer key/value heads). Errors if a dimension is
    /// 0, n_kv_head does not divide n_head, the head size exceeds the attention kernels' max, or k (or v) would
    /// not fit one storage binding of this adapter.
    pub fn new(gpu: &Gpu, batch: usize, heads: impl Into<Heads>, head_size: usize, max_len: usize) -> Result<KvCache> {
        const OP: &str = "KvCache::new";
        let Heads { n_head, n_kv_head } = heads.into();
        let shape = [batch, n_kv_head, max_len, head_size];
        if shape.contains(&0) || n_head == 0 {
            return Err(Error::Empty { op: OP, what: "cache", shape: shape.to_vec() });
        }
        Heads::new(n_head, n_kv_head).check(OP)?;
        if head_size > MAX_HEAD_SIZE {
            let message = format!("head size {head_size} exceeds the attention kernels' max of {MAX_HEAD_SIZE}");
            return Err(Error::Invalid { op: OP, message });
        }
        let numel = shape.iter().product::<usize>();
        fits_u32(OP, "cache", numel)?;
        let limit = gpu.limits().max_storage_buffer_binding_size;
        let bytes = (numel * DType::F32.size()) as u64;
        if bytes > limit {
            return Err(gpu.limit_error(OP, "k (and v)", bytes, limit, "max_storage_buffer_binding_size"));
        }
        let k = gpu.alloc(&shape, DType::F32)?;
        let v = gpu.alloc(&shape, DType::F32)?;
        fill(gpu, &k, 0.0)?;
        fill(gpu, &v, 0.0)?;
        Ok(KvCache { k, v, batch, n_head, n_kv_head, head_size, max_len })
    }

    fn heads(&self) -> Heads {
        Heads::new(self.n_head, self.n_kv_head)
    }

    fn params(&self) -> Params {
        Params {
            nh: self.n_head as u32,
            nkv: self.n_kv_head as u32,
            hs: self.head_size as u32,
            tmax: self.max_len as u32,
            c: (self.n_head * self.head_size) as u32,
            w: self.heads().qkv_width(self.head_size) as u32,
            scale: 1.0 / (self.head_size as f32).sqrt(),
            ..Params::default()
        }
    }

    /// HS rounded up to a power of two, over 4: the head loops' constant trip count (`HS4` in the WGSL).
    fn hs4(&self) -> usize {
        self.head_size.next_power_of_two().div_ceil(4)
    }
}

/// Checks qkv ([B, T, W] f32 with B <= the cache's batch and W = (n_head + 2·n_kv_head)·head_size of the cache)
/// and that positions pos..pos+T fit the cache. Returns the immediates with b, t and pos set.
fn check(op: &'static str, cache: &KvCache, qkv: &Tensor, pos: usize) -> Result<Params> {
    // The fields are public: a cache built by hand must still match the sizes the kernels index with.
    cache.heads().check(op)?;
    let shape = [cache.batch, cache.n_kv_head, cache.max_len, cache.head_size];
    for (what, t) in [("cache.k", &cache.k), ("cache.v", &cache.v)] {
        expect_dtype(op, what, t, DType::F32)?;
        shape_is(op, what, t, &shape)?;
    }
    if cache.head_size > MAX_HEAD_SIZE {
        let message = format!("head size {} exceeds the kernels' max of {MAX_HEAD_SIZE}", cache.head_size);
        return Err(Error::Invalid { op, message });
    }
    expect_dtype(op, "qkv", qkv, DType::F32)?;
    let width = cache.heads().qkv_width(cache.head_size);
    let &[b, t, w] = qkv.shape() else {
        return Err(Error::Shape {
            op,
            what: "qkv",
            expected: "3-D [B, T, (n_head + 2·n_kv_head)·head_size]".into(),
            got: format!("{:?}", qkv.shape()),
        });
    };
    nonempty(op, "qkv", qkv)?;
    if w != width || b > cache.batch {
        return Err(Error::Shape {
            op,
            what: "qkv",
            expected: format!(
                "[B <= {}, T, {width}] ((n_head {} + 2 · n_kv_head {}) · head_size {} of the cache)",
                cache.batch, cache.n_head, cache.n_kv_head, cache.head_size
            ),
            got: format!("{:?}", qkv.shape()),
        });
    }
    if pos + t > cache.max_len {
        let message = format!(
            "positions {pos}..{} (pos {pos} + {t} new tokens) exceed the cache's max_len {}",
            pos + t,
            cache.max_len
        );
        return Err(Error::Invalid { op, message });
    }
    fits_u32(op, "qkv", qkv.numel())?;
    Ok(Params { b: b as u32, t: t as u32, pos: pos as u32, ..cache.params() })
}

/// Append the k and v parts of a packed qkv [B, T_new, W] at positions pos..pos+T_new of every batch row (prefill
/// writes a whole prompt, decode one token). Error if pos + T_new > max_len (say both numbers).
///
/// B may be smaller than the cache's batch: rows 0..B are written (prefill one prompt as a batch of 1, then fan it
/// out with [`kv_broadcast_row`]).
pub fn kv_append(gpu: &Gpu, cache: &KvCache, qkv: &Tensor, pos: usize) -> Result<()> {
    const OP: &str = "kv_append";
    let params = check(OP, cache, qkv, pos)?;
    let n = params.b as usize * params.t as usize * cache.n_kv_head * cache.head_size;
    gpu.dispatch(&Launch {
        op: OP,
        flops: 0,
        shader: &ATTENTION_CACHED,
        entry: "kv_append",
        overrides: &[],
        args: &[qkv, &cache.k, &cache.v],
        params: bytemuck::bytes_of(&params),
        groups: grid_1d(n, WG_1D),
    })
}

/// Causal attention of the T_new queries in qkv [B, T_new, W] (at absolute positions pos..pos+T_new) over cached
/// keys 0..pos+T_new (call kv_append first). Returns y [B, T_new, C] with heads merged like attention_forward, equal
/// to attention_forward's rows pos..pos+T_new on the whole sequence (up to f32 rounding: the sums run in another
/// order). Flash style, never T×T in memory: up to 8 new tokens, one workgroup per query whose invocations split
/// the keys; more, workgroups of 64 queries sharing staged key blocks. B may be smaller than the cache's batch (rows
/// 0..B). Cache positions past pos + T_new are never read.
pub fn attention_cached(gpu: &Gpu, cache: &KvCache, qkv: &Tensor, pos: usize) -> Result<Tensor> {
    const OP: &str = "attention_cached";
    let mut params = check(OP, cache, qkv, pos)?;
    let (b, t) = (params.b, params.t);
    let y = gpu.alloc(&[b as usize, t as usize, cache.n_head * cache.head_size], DType::F32)?;
    let hs4 = cache.hs4();
    let nh = cache.n_head as u32;
    let (entry, groups) = if (t as usize) <= SPLIT_MAX_ROWS {
        ("attention_cached_split", [t, nh, b])
    } else {
        ("attention_cached_rows", [t.div_ceil(BR), nh, b])
    };
    params.bc = (TILE4 / hs4).min(MAX_BC) as u32;
    gpu.dispatch(&Launch {
        op: OP,
        flops: 0,
        shader: &ATTENTION_CACHED,
        entry,
        overrides: &[("BR", BR as f64), ("HS4", hs4 as f64)],
        args: &[qkv, &cache.k, &cache.v, &y],
        params: bytemuck::bytes_of(&params),
        groups,
    })?;
    Ok(y)
}

/// Copy positions 0..len of batch row `src` into every row of `dst` (a row equal to `src` is left as is). Errors
/// if a row is out of range or len > max_len; len = 0 or an empty `dst` does nothing.
pub fn kv_copy_rows(gpu: &Gpu, cache: &KvCache, src: usize, dst: Range<usize>, len: usize) -> Result<()> {
    const OP: &str = "kv_copy_rows";
    let b = cache.batch;
    if src >= b || dst.start > dst.end || dst.end > b {
        let message = format!("source row {src} and destination rows {dst:?} must lie in the cache's {b} rows");
        return Err(Error::Invalid { op: OP, message });
    }
    if len > cache.max_len {
        let message = format!("len {len} exceeds the cache's max_len {}", cache.max_len);
        return Err(Error::Invalid { op: OP, message });
    }
    if len == 0 || dst.is_empty() {
        return Ok(());
    }
    let params =
        Params { src: src as u32, dst0: dst.start as u32, dst1: dst.end as u32, len: len as u32, ..cache.params() };
    gpu.dispatch(&Launch {
        op: OP,
        flops: 0,
        shader: &ATTENTION_CACHED,
        entry: "kv_copy_rows",
        overrides: &[],
        args: &[&cache.k, &cache.v],
        params: bytemuck::bytes_of(&params),
        groups: grid_1d(dst.len() * cache.n_kv_head * len * cache.head_size, WG_1D),
    })
}

/// Copy batch row `src` of the cache (positions 0..len) into every other row (prefill a prompt once, then fan it
/// out to the G samples of a group for RL).
pub fn kv_broadcast_row(gpu: &Gpu, cache: &KvCache, src: usize, len: usize) -> Result<()> {
    kv_copy_rows(gpu, cache, src, 0..cache.batch, len)
}

pub mod cpu {
    use crate::ops::attention::Heads;

    /// Attention of the queries at positions pos..pos+T_new given the whole sequence's qkv [B, pos+T_new, W]: the
    /// rows pos.. of the full causal attention (what a correct cache must reproduce), [B, T_new, C].
    pub fn attention_cached(
        qkv_full: &[f64],
        b: usize,
        pos: usize,
        t_new: usize,
        c: usize,
        heads: impl Into<Heads>,
    ) -> Vec<f64> {
        let t = pos + t_new;
        let (y, _) = crate::ops::attention::cpu::attention_forward(qkv_full, b, t, c, heads);
        y.chunks(t * c).flat_map(|rows| rows[pos * c..].to_vec()).collect()
    }
}

#[cfg(test)]
#[path = "kv_cache_tests.rs"]
mod tests;
