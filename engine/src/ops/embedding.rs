//! Token + position embedding, out[b, t] = wte[tokens[b, t]] + wpe[t] (the first op of a GPT), and its backward,
//! a deterministic scatter-add into the two tables; and the token-only embedding of models with rotary positions.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::{fits_u32, grid_1d, nonempty, shape_is, WG_1D};
use crate::shaders::EMBEDDING;
use crate::{DType, Error, Gpu, Result, Tensor};
use bytemuck::Zeroable;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    c: u32,
    t: u32,
    v: u32,
    /// Backward only: distinct token ids and positions.
    distinct: u32,
    pos_distinct: u32,
    /// Forward only: read position ids instead of t, and the rows of wpe.
    has_positions: u32,
    max_t: u32,
    /// Backward only: B·T.
    batch_t: u32,
    /// Forward only: add wpe (0 for models without a position table).
    has_wpe: u32,
    /// The bound part of wte (or dwte) holds ids v0..v0 + v_rows: tables larger than one storage binding are
    /// processed one row range at a time.
    v0: u32,
    v_rows: u32,
}

/// Field names, offsets and sizes of [`Params`], for the test that holds them against the WGSL struct.
#[cfg(test)]
pub(crate) fn params_layout() -> Vec<crate::ops::Field> {
    crate::layout_of!(Params { n, c, t, v, distinct, pos_distinct, has_positions, max_t, batch_t, has_wpe, v0, v_rows })
}

#[cfg(test)]
pub(crate) fn params_size() -> usize {
    std::mem::size_of::<Params>()
}

/// The two dims of a rank-2 tensor, or a Shape error naming the expected layout.
fn dims2(op: &'static str, what: &'static str, layout: &str, t: &Tensor) -> Result<(usize, usize)> {
    match *t.shape() {
        [a, b] => Ok((a, b)),
        _ => Err(Error::Shape { op, what, expected: layout.into(), got: format!("{:?}", t.shape()) }),
    }
}

/// The checks both backward launchers share: `dout` [B, T, C] and `dwte` [V, C] (and `dwpe`, when given, of dtype
/// F32), in that order. Returns (B, T, C, V).
fn grad_dims(
    op: &'static str,
    dout: &Tensor,
    dwte: &Tensor,
    dwpe: Option<&Tensor>,
) -> Result<(usize, usize, usize, usize)> {
    for (what, t) in [("dout", Some(dout)), ("dwte", Some(dwte)), ("dwpe", dwpe)] {
        if let Some(t) = t {
            nonempty(op, what, t)?;
            expect_dtype(op, what, t, DType::F32)?;
        }
    }
    let &[b, t, c] = dout.shape() else {
        return Err(Error::Shape {
            op,
            what: "dout",
            expected: "[B, T, C]".into(),
            got: format!("{:?}", dout.shape()),
        });
    };
    let (v, _) = dims2(op, "dwte", "[V, C]", dwte)?;
    shape_is(op, "dwte", dwte, &[v, c])?;
    Ok((b, t, c, v))
}

/// `tokens` I32 [B, T], `wte` [V, C], `wpe` [maxT, C] → [B, T, C] = wte[token] + wpe[t]. T must be at most maxT.
/// A token id outside [0, V) makes its row NaN: ids live on the GPU and checking them on the host would cost a
/// readback every step, so the NaN detection downstream reports the step instead.
pub fn embedding(gpu: &Gpu, tokens: &Tensor, wte: &Tensor, wpe: &Tensor) -> Result<Tensor> {
    embedding_at(gpu, tokens, None, wte, wpe)
}

/// Like [`embedding`] with the position of each token given: `positions` I32 [B, T] (None = t), so sequences
/// packed into one row each start at position 0. A position outside [0, maxT) makes its row NaN, like a bad id.
pub fn embedding_at(
    gpu: &Gpu,
    tokens: &Tensor,
    positions: Option<&Tensor>,
    wte: &Tensor,
    wpe: &Tensor,
) -> Result<Tensor> {
    let op = "embedding";
    for (what, t, dtype) in [("tokens", tokens, DType::I32), ("wte", wte, DType::F32), ("wpe", wpe, DType::F32)] {
        nonempty(op, what, t)?;
        expect_dtype(op, what, t, dtype)?;
    }
    let (b, t) = dims2(op, "tokens", "[B, T]", tokens)?;
    let (v, c) = dims2(op, "wte", "[V, C]", wte)?;
    let (max_t, wpe_c) = dims2(op, "wpe", "[maxT, C]", wpe)?;
    if wpe_c != c {
        return Err(Error::Shape {
            op,
            what: "wpe",
            expected: format!("[maxT, {c}] (C of wte)"),
            got: format!("{:?}", wpe.shape()),
        });
    }
    if t > max_t {
        return Err(Error::Shape {
            op,
            what: "tokens",
            expected: format!("[B, T] with T <= {max_t} (the rows of wpe)"),
            got: format!("{:?}", tokens.shape()),
        });
    }
    if let Some(pos) = positions {
        expect_dtype(op, "positions", pos, DType::I32)?;
        shape_is(op, "positions", pos, &[b, t])?;
    }
    fits_u32(op, "wte", wte.numel())?;
    let n = b * t * c;
    let params = Params {
        n: fits_u32(op, "output", n)?,
        c: c as u32,
        t: t as u32,
        v: v as u32,
        distinct: 0,
        pos_distinct: 0,
        has_positions: positions.is_some() as u32,
        max_t: max_t as u32,
        batch_t: 0,
        has_wpe: 1,
        v0: 0,
        v_rows: 0,
    };
    let out = gpu.alloc(&[b, t, c], DType::F32)?;
    // The kernel reads `positions` only when has_positions is set, but every binding needs a buffer.
    let dummy;
    let positions = match positions {
        Some(p) => p,
        None => {
            dummy = gpu.placeholder()?;
            &dummy
        }
    };
    gather(gpu, op, params, [tokens, wte, wpe, &out, positions])?;
    Ok(out)
}

/// ACCUMULATES (+=) into `dwte` [V, C] and `dwpe` [maxT, C] the gradient of out = wte[tokens] + wpe[t] given
/// `dout` [B, T, C]. `tokens` is the host copy of the ids [B·T] the forward used. The host groups positions by
/// token (a counting sort), so the kernel sums each distinct token's rows in a fixed order, and dwpe[t] gets
/// Σ_b dout[b, t] in b order: no float atomics, bit-reproducible. An id outside [0, V) is an `Error::Invalid`
/// naming its position (nothing is recorded).
pub fn embedding_backward(gpu: &Gpu, tokens: &[i32], dout: &Tensor, dwte: &Tensor, dwpe: &Tensor) -> Result<()> {
    embedding_backward_at(gpu, tokens, None, dout, dwte, dwpe)
}

/// The backward of [`embedding_at`]: `positions` is the host copy of the position ids (None = t); dwpe[p] gets the
/// sum of dout over the tokens at position p, in ascending flat index. A position outside [0, maxT) is an
/// `Error::Invalid` naming it.
pub fn embedding_backward_at(
    gpu: &Gpu,
    tokens: &[i32],
    positions: Option<&[i32]>,
    dout: &Tensor,
    dwte: &Tensor,
    dwpe: &Tensor,
) -> Result<()> {
    let op = "embedding_backward";
    let (b, t, c, v) = grad_dims(op, dout, dwte, Some(dwpe))?;
    let (max_t, _) = dims2(op, "dwpe", "[maxT, C]", dwpe)?;
    if t > max_t || dwpe.shape()[1] != c {
        return Err(Error::Shape {
            op,
            what: "dwpe",
            expected: format!("[maxT, {c}] with maxT >= T = {t}"),
            got: format!("{:?}", dwpe.shape()),
        });
    }
    if tokens.len() != b * t {
        return Err(Error::Shape {
            op,
            what: "tokens",
            expected: format!("{} ids (B·T of dout {:?})", b * t, dout.shape()),
            got: format!("{} ids", tokens.len()),
        });
    }
    if dwte.buffer_id() == dwpe.buffer_id() {
        return Err(Error::Invalid { op, message: "dwte and dwpe share one buffer".into() });
    }
    fits_u32(op, "dwte", dwte.numel())?;
    fits_u32(op, "dout", dout.numel())?;
    let mut buckets = bucket_positions(op, tokens, v, t)?;
    let distinct = (buckets.len() - 1 - tokens.len()) / 2;
    let default_positions: Vec<i32>;
    let positions = match positions {
        Some(p) if p.len() != b * t => {
            return Err(Error::Shape {
                op,
                what: "positions",
                expected: format!("{} ids (B·T of dout {:?})", b * t, dout.shape()),
                got: format!("{} ids", p.len()),
            })
        }
        Some(p) => p,
        None => {
            default_positions = (0..b * t).map(|i| (i % t) as i32).collect();
            &default_positions
        }
    };
    let by_position = bucket_positions(op, positions, max_t, t)
        .map_err(|e| Error::Invalid { op, message: format!("position ids: {e}") })?;
    let pos_distinct = (by_position.len() - 1 - tokens.len()) / 2;
    buckets.extend(by_position);
    let n = fits_u32(op, "work items ((distinct tokens + positions) · C)", (distinct + pos_distinct) * c)?;
    let params = Params {
        n,
        c: c as u32,
        t: t as u32,
        v: v as u32,
        distinct: distinct as u32,
        pos_distinct: pos_distinct as u32,
        has_positions: 0,
        max_t: max_t as u32,
        batch_t: (b * t) as u32,
        has_wpe: 1,
        v0: 0,
        v_rows: 0,
    };
    let buckets = gpu.upload_i32(&buckets, &[buckets.len()])?;
    scatter(gpu, op, params, [&buckets, dout, dwte, dwpe])
}

/// `tokens` I32 [B, T], `wte` [V, C] → [B, T, C] = wte[token]: the embedding of models whose positions enter
/// elsewhere (rotary). A token id outside [0, V) makes its row NaN, as in [`embedding`].
pub fn token_embedding(gpu: &Gpu, tokens: &Tensor, wte: &Tensor) -> Result<Tensor> {
    let op = "token_embedding";
    for (what, t, dtype) in [("tokens", tokens, DType::I32), ("wte", wte, DType::F32)] {
        nonempty(op, what, t)?;
        expect_dtype(op, what, t, dtype)?;
    }
    let (b, t) = dims2(op, "tokens", "[B, T]", tokens)?;
    let (v, c) = dims2(op, "wte", "[V, C]", wte)?;
    fits_u32(op, "wte", wte.numel())?;
    let n = b * t * c;
    let params = Params { n: fits_u32(op, "output", n)?, c: c as u32, t: t as u32, v: v as u32, ..Params::zeroed() };
    let out = gpu.alloc(&[b, t, c], DType::F32)?;
    let (wpe, positions) = (gpu.placeholder()?, gpu.placeholder()?);
    gather(gpu, op, params, [tokens, wte, &wpe, &out, &positions])?;
    Ok(out)
}

/// ACCUMULATES (+=) into `dwte` [V, C] the gradient of [`token_embedding`] given `dout` [B, T, C]; `tokens` is the
/// host copy of the ids. Deterministic like [`embedding_backward`]; an id outside [0, V) is an `Error::Invalid`.
pub fn token_embedding_backward(gpu: &Gpu, tokens: &[i32], dout: &Tensor, dwte: &Tensor) -> Result<()> {
    let op = "token_embedding_backward";
    let (b, t, c, v) = grad_dims(op, dout, dwte, None)?;
    if tokens.len() != b * t {
        return Err(Error::Shape {
            op,
            what: "tokens",
            expected: format!("{} ids (B·T of dout {:?})", b * t, dout.shape()),
            got: format!("{} ids", tokens.len()),
        });
    }
    fits_u32(op, "dwte", dwte.numel())?;
    fits_u32(op, "dout", dout.numel())?;
    let buckets = bucket_positions(op, tokens, v, t)?;
    let distinct = (buckets.len() - 1 - tokens.len()) / 2;
    let n = fits_u32(op, "work items (distinct tokens · C)", distinct * c)?;
    let params = Params {
        n,
        c: c as u32,
        t: t as u32,
        v: v as u32,
        distinct: distinct as u32,
        batch_t: (b * t) as u32,
        ..Params::zeroed()
    };
    let buckets = gpu.upload_i32(&buckets, &[buckets.len()])?;
    let dwpe = gpu.placeholder()?;
    scatter(gpu, op, params, [&buckets, dout, dwte, &dwpe])
}

/// The forward's dispatch, once per part of wte that fits one binding; `args` = [tokens, wte, wpe, out,
/// positions]. Each part writes the rows of the tokens it holds, so every output row has one writer.
fn gather(gpu: &Gpu, op: &'static str, params: Params, args: [&Tensor; 5]) -> Result<()> {
    let wte = args[1];
    let (v, c) = (wte.shape()[0], wte.shape()[1]);
    for (v0, v1) in gpu.split_rows(op, v, c)? {
        let part = wte.rows(v0, v1)?;
        let params = Params { v0: v0 as u32, v_rows: (v1 - v0) as u32, ..params };
        gpu.dispatch(&Launch {
            op,
            flops: 0,
            shader: &EMBEDDING,
            entry: "embedding",
            overrides: &[],
            args: &[args[0], &part, args[2], args[3], args[4]],
            params: bytemuck::bytes_of(&params),
            groups: grid_1d(params.n as usize, WG_1D),
        })?;
    }
    Ok(())
}

/// The backward's dispatch, once per part of dwte that fits one binding; `args` = [buckets, dout, dwte, dwpe].
/// Each part adds the rows of the tokens it holds; the position table is done by the first part alone.
fn scatter(gpu: &Gpu, op: &'static str, params: Params, args: [&Tensor; 4]) -> Result<()> {
    let dwte = args[2];
    let (v, c) = (dwte.shape()[0], dwte.shape()[1]);
    for (i, (v0, v1)) in gpu.split_rows(op, v, c)?.into_iter().enumerate() {
        let part = dwte.rows(v0, v1)?;
        let pos_distinct = if i == 0 { params.pos_distinct } else { 0 };
        let params = Params {
            n: (params.distinct + pos_distinct) * params.c,
            pos_distinct,
            v0: v0 as u32,
            v_rows: (v1 - v0) as u32,
            ..params
        };
        gpu.dispatch(&Launch {
            op,
            flops: 0,
            shader: &EMBEDDING,
            entry: "embedding_backward",
            overrides: &[],
            args: &[args[0], args[1], &part, args[3]],
            params: bytemuck::bytes_of(&params),
            groups: grid_1d(params.n as usize, WG_1D),
        })?;
    }
    Ok(())
}

/// Positions grouped by token id, stably (a counting sort): [ids (U) | offsets (U + 1) | positions (N)] for the U
/// distinct ids in ascending order; token k's positions are positions[offsets[k]..offsets[k + 1]], ascending.
fn bucket_positions(op: &'static str, tokens: &[i32], v: usize, t: usize) -> Result<Vec<i32>> {
    let mut counts = vec![0u32; v];
    for (i, &tok) in tokens.iter().enumerate() {
        if tok < 0 || tok as usize >= v {
            return Err(Error::Invalid {
                op,
                message: format!("token id {tok} at position {i} (b {}, t {}) is outside [0, {v})", i / t, i % t),
            });
        }
        counts[tok as usize] += 1;
    }
    let ids: Vec<usize> = (0..v).filter(|&id| counts[id] > 0).collect();
    let (u, n) = (ids.len(), tokens.len());
    let mut out = Vec::with_capacity(2 * u + 1 + n);
    out.extend(ids.iter().map(|&id| id as i32));
    // Reuse counts as each id's next free slot in the positions section.
    let mut next = 0u32;
    for &id in &ids {
        out.push(next as i32);
        (counts[id], next) = (next, next + counts[id]);
    }
    out.push(n as i32);
    let base = out.len();
    out.resize(base + n, 0);
    for (i, &tok) in tokens.iter().enumerate() {
        let slot = &mut counts[tok as usize];
        out[base + *slot as usize] = i as i32;
        *slot += 1;
    }
    Ok(out)
}

pub mod cpu {
    /// wte rows of `tokens` ([B·T] flattened), [B·T, C]; out-of-range ids give NaN rows, as the kernel.
    pub fn token_embedding(tokens: &[i32], wte: &[f64], c: usize) -> Vec<f64> {
        let v = (wte.len() / c) as i64;
        let row = |&tok: &i32| match tok >= 0 && (tok as i64) < v {
            true => wte[tok as usize * c..][..c].to_vec(),
            false => vec![f64::NAN; c],
        };
        tokens.iter().flat_map(row).collect()
    }

    /// Position of flat index i: positions[i] if given, else i mod T.
    fn pos(positions: Option<&[i32]>, i: usize, t: usize) -> i64 {
        positions.map_or((i % t) as i64, |p| p[i] as i64)
    }

    /// [B, T, C] flattened, for `tokens` [B, T] flattened; out-of-range ids give NaN rows, as the kernel.
    pub fn embedding(tokens: &[i32], t: usize, wte: &[f64], wpe: &[f64], c: usize) -> Vec<f64> {
        embedding_at(tokens, None, t, wte, wpe, c)
    }

    /// [`embedding`] with position ids (None = t); a position outside [0, maxT) gives a NaN row, as the kernel.
    pub fn embedding_at(
        tokens: &[i32],
        positions: Option<&[i32]>,
        t: usize,
        wte: &[f64],
        wpe: &[f64],
        c: usize,
    ) -> Vec<f64> {
        let (v, max_t) = ((wte.len() / c) as i64, (wpe.len() / c) as i64);
        let mut out = Vec::with_capacity(tokens.len() * c);
        for (i, &tok) in tokens.iter().enumerate() {
            let p = pos(positions, i, t);
            if tok < 0 || tok as i64 >= v || p < 0 || p >= max_t {
                out.extend(std::iter::repeat_n(f64::NAN, c));
            } else {
                let row = &wpe[p as usize * c..][..c];
                out.extend(wte[tok as usize * c..][..c].iter().zip(row).map(|(a, b)| a + b));
            }
        }
        out
    }

    /// Accumulates into `dwte` [V, C] and `dwpe` [maxT, C] the gradient of [`embedding`] given `dout` [B, T, C]
    /// flattened; ids must lie in [0, V) (the GPU launcher refuses others).
    pub fn embedding_backward(tokens: &[i32], t: usize, dout: &[f64], c: usize, dwte: &mut [f64], dwpe: &mut [f64]) {
        embedding_backward_at(tokens, None, t, dout, c, dwte, dwpe)
    }

    /// The backward of [`embedding_at`].
    pub fn embedding_backward_at(
        tokens: &[i32],
        positions: Option<&[i32]>,
        t: usize,
        dout: &[f64],
        c: usize,
        dwte: &mut [f64],
        dwpe: &mut [f64],
    ) {
        for (i, (&tok, d)) in tokens.iter().zip(dout.chunks(c)).enumerate() {
            let tok = usize::try_from(tok).expect("token ids are non-negative");
            for (w, g) in dwte[tok * c..][..c].iter_mut().zip(d) {
                *w += g;
            }
            let p = usize::try_from(pos(positions, i, t)).expect("positions are non-negative");
            for (w, g) in dwpe[p * c..][..c].iter_mut().zip(d) {
                *w += g;
            }
        }
    }
}

#[cfg(test)]
#[path = "embedding_tests.rs"]
mod tests;
