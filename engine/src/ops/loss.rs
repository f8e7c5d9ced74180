//! Fused softmax cross-entropy over the vocabulary (forward): the per-row loss and the per-row logsumexp that the
//! backward pass reuses, in one kernel that never materializes the probabilities.

use crate::gpu::expect_dtype;
use crate::launch::Launch;
use crate::ops::norm::{row_grid, rows_cols};
use crate::ops::{nonempty, shape_is};
use crate::shaders::LOSS;
use crate::{DType, Error, Gpu, Result, Tensor};

/// Targets equal to this contribute exactly 0 loss (padding, masked positions), as PyTorch's `ignore_index`.
pub const IGNORE_INDEX: i32 = -1;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    v: u32,
}

/// Cross-entropy of `logits` [N, V] (or [B, T, V]: any leading dims) against I32 `targets` shaped like the
/// leading dims. Returns (losses shaped like `targets`, logsumexp [N]); per row, loss = logsumexp(row) -
/// row[target]. A target of [`IGNORE_INDEX`] gives exactly 0. Any other target outside [0, V) makes that row's loss
/// NaN: ids live on the GPU and checking them on the host would cost a readback every step, so the NaN detection
/// downstream reports the step instead.
pub fn cross_entropy(gpu: &Gpu, logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "cross_entropy";
    let (rows, v) = rows_cols(op, "logits", logits)?;
    let rank = logits.shape().len();
    if rank < 2 {
        return Err(Error::Shape {
            op,
            what: "logits",
            expected: "[N, V] or [B, T, V]".into(),
            got: format!("{:?}", logits.shape()),
        });
    }
    nonempty(op, "targets", targets)?;
    expect_dtype(op, "targets", targets, DType::I32)?;
    shape_is(op, "targets", targets, &logits.shape()[..rank - 1])?;
    let losses = gpu.alloc(targets.shape(), DType::F32)?;
    let lse = gpu.alloc(&[rows], DType::F32)?;
    let params = Params { rows: rows as u32, v: v as u32 };
    gpu.dispatch(&Launch {
        op,
        shader: &LOSS,
        entry: "cross_entropy",
        overrides: &[],
        args: &[logits, targets, &losses, &lse],
        params: bytemuck::bytes_of(&params),
        groups: row_grid(rows),
    })?;
    Ok((losses, lse))
}

pub mod cpu {
    use super::IGNORE_INDEX;

    /// (losses, logsumexp) of rows of length `v`; the same ignore and out-of-range rules as the kernel.
    pub fn cross_entropy(logits: &[f64], targets: &[i32], v: usize) -> (Vec<f64>, Vec<f64>) {
        let mut losses = Vec::with_capacity(targets.len());
        let mut lses = Vec::with_capacity(targets.len());
        for (row, &t) in logits.chunks(v).zip(targets) {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            let loss = match t {
                IGNORE_INDEX => 0.0,
                t if t < 0 || t as usize >= v => f64::NAN,
                t => lse - row[t as usize],
            };
            losses.push(loss);
            lses.push(lse);
        }
        (losses, lses)
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;
    use crate::testing::{assert_close, gpu, random_vec, rng, to_f64};

    /// Row counts and vocabulary sizes that are not multiples of the 256-thread workgroup.
    const ROWS: &[usize] = &[1, 3, 17, 129, 300];
    const VOCABS: &[usize] = &[1, 7, 64, 255, 769];
    /// GPT-2's vocabulary.
    const GPT2_VOCAB: usize = 50257;

    /// Valid targets with about a quarter ignored.
    fn targets(rows: usize, v: usize, seed: u64) -> Vec<i32> {
        let mut r = rng(seed);
        (0..rows).map(|_| if r.random_bool(0.25) { IGNORE_INDEX } else { r.random_range(0..v as i32) }).collect()
    }

    fn check(rows: usize, v: usize, scale: f32, seed: u64) {
        let gpu = gpu();
        let x: Vec<f32> = random_vec(rows * v, seed).iter().map(|a| a * scale).collect();
        let t = targets(rows, v, seed + 1);
        let (tl, tt) = (gpu.upload(&x, &[rows, v]).unwrap(), gpu.upload_i32(&t, &[rows]).unwrap());
        let (loss, lse) = cross_entropy(gpu, &tl, &tt).unwrap();
        let (loss, lse) = (gpu.read(&loss).unwrap(), gpu.read(&lse).unwrap());
        let (want_loss, want_lse) = cpu::cross_entropy(&to_f64(&x), &t, v);
        let what = format!("cross_entropy rows={rows} v={v} scale={scale}");
        for (i, &ti) in t.iter().enumerate() {
            if ti == IGNORE_INDEX {
                assert!(loss[i] == 0.0 && loss[i].is_sign_positive(), "{what}: ignored row {i} has loss {}", loss[i]);
            }
        }
        // lse = max + log(sum): the max is exact, so the error is ~2 ulp of |lse| <= scale + ln V plus the
        // sum's relative error (~(V/256 + 8) eps, at most 1.2e-5 for V = 50257, in practice far less); loss
        // = lse - x[t] adds one more rounding of the same size.
        let atol = 1e-6 + 4.0 * f32::EPSILON as f64 * (scale as f64 + (v as f64).ln());
        assert_close(&lse, &want_lse, 2e-6, atol, &format!("{what} lse"));
        assert_close(&loss, &want_loss, 2e-6, atol, &format!("{what} loss"));
    }

    #[test]
    fn matches_reference() {
        for (i, &rows) in ROWS.iter().enumerate() {
            for (j, &v) in VOCABS.iter().enumerate() {
                check(rows, v, 4.0, (10 * i + j) as u64);
            }
        }
    }

    #[test]
    fn gpt2_vocabulary_and_large_logits() {
        check(3, GPT2_VOCAB, 4.0, 100);
        // Logits in +-100: exp overflows f32 past 88.7, so only the max subtraction keeps these rows finite.
        check(17, 769, 100.0, 101);
        check(2, GPT2_VOCAB, 100.0, 102);
    }

    #[test]
    fn repeated_runs_are_bitwise_identical() {
        // Fixed-order reductions, no atomics: the same inputs must give the same bits every time.
        let gpu = gpu();
        let v = GPT2_VOCAB;
        let logits = gpu.upload(&random_vec(2 * v, 300), &[2, v]).unwrap();
        let tg = gpu.upload_i32(&[5, 50_000], &[2]).unwrap();
        let runs: Vec<_> = (0..3)
            .map(|_| {
                let (loss, lse) = cross_entropy(gpu, &logits, &tg).unwrap();
                (gpu.read(&loss).unwrap(), gpu.read(&lse).unwrap())
            })
            .collect();
        assert!(runs.iter().all(|r| r == &runs[0]), "{runs:?}");
    }

    #[test]
    fn leading_dims_and_out_of_range_targets() {
        let gpu = gpu();
        let (b, t, v) = (2, 3, 7);
        let x = random_vec(b * t * v, 200);
        // Row 0: V itself, row 1: a negative id other than -1, both NaN; the rest are valid or ignored.
        let tg = [v as i32, -2, 0, IGNORE_INDEX, 6, 3];
        let (loss, lse) =
            cross_entropy(gpu, &gpu.upload(&x, &[b, t, v]).unwrap(), &gpu.upload_i32(&tg, &[b, t]).unwrap()).unwrap();
        assert_eq!((loss.shape(), lse.shape()), (&[b, t][..], &[b * t][..]));
        let (loss, lse) = (gpu.read(&loss).unwrap(), gpu.read(&lse).unwrap());
        let (want_loss, want_lse) = cpu::cross_entropy(&to_f64(&x), &tg, v);
        assert!(loss[0].is_nan() && loss[1].is_nan(), "out-of-range targets give NaN, got {:?}", &loss[..2]);
        assert_eq!(loss[3], 0.0);
        // Logits in [-1, 1), V = 7: lse ~ 2, so a few ulp of 2 absolute.
        assert_close(&loss[2..], &want_loss[2..], 2e-6, 2e-6, "cross_entropy [B, T, V] loss");
        assert_close(&lse, &want_lse, 2e-6, 2e-6, "cross_entropy [B, T, V] lse");
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let gpu = gpu();
        let logits = gpu.upload(&random_vec(12, 1), &[3, 4]).unwrap();
        let good = gpu.upload_i32(&[0, 1, 2], &[3]).unwrap();
        let as_f32 = gpu.upload(&[0.0, 1.0, 2.0], &[3]).unwrap();
        let short = gpu.upload_i32(&[0, 1], &[2]).unwrap();
        let rank2 = gpu.upload_i32(&[0, 1, 2], &[3, 1]).unwrap();
        let flat = gpu.upload(&random_vec(4, 2), &[4]).unwrap();
        let int_logits = gpu.upload_i32(&[0; 12], &[3, 4]).unwrap();
        let err = |l: &Tensor, t: &Tensor| cross_entropy(gpu, l, t).expect_err("must be refused");
        assert!(matches!(err(&logits, &as_f32), Error::DType { op: "cross_entropy", what: "targets", .. }));
        assert!(matches!(err(&logits, &short), Error::Shape { op: "cross_entropy", what: "targets", .. }));
        assert!(matches!(err(&logits, &rank2), Error::Shape { op: "cross_entropy", what: "targets", .. }));
        assert!(matches!(err(&flat, &good), Error::Shape { op: "cross_entropy", what: "logits", .. }));
        assert!(matches!(err(&int_logits, &good), Error::DType { op: "cross_entropy", what: "logits", .. }));
    }
}
