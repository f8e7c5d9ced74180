//! The data-parallel path on one process: with a one-rank collective the bucketed readback, all-reduce and
//! write-back must change no bit of training, sharded or not; the replica check must name a diverged rank.

use std::sync::Arc;

use super::*;
use crate::arch::Model;
use crate::train::collective::Solo;
use crate::train::pretrain::{TrainConfig, Trainer};
use crate::ModelConfig;

fn trainer(gpu: &'static Gpu) -> Trainer<'static> {
    let config = ModelConfig::gpt2(37, 16, 2, 2, 16);
    let tokens: Arc<Vec<u32>> = Arc::new((0..3000).map(|i| (i * 7 % 37) as u32).collect());
    let cfg = TrainConfig { steps: 3, batch: 3, seq_len: 11, grad_accum: 2, ..TrainConfig::default() };
    Trainer::new(gpu, Model::new(gpu, &config, 3).unwrap(), cfg, tokens).unwrap()
}

fn run(tr: &mut Trainer) -> (Vec<(f32, f32)>, Vec<HostTensor>) {
    let steps = (0..3).map(|_| tr.step().map(|m| (m.loss, m.grad_norm)).unwrap()).collect();
    (steps, tr.checkpoint(None).unwrap().model)
}

#[test]
fn one_rank_data_parallel_is_bit_identical_to_training_alone() {
    let gpu = kiln_engine::testing::gpu();
    let (plain, plain_w) = run(&mut trainer(gpu));
    for zero in [false, true] {
        let mut tr = trainer(gpu);
        // 1 KiB buckets: many, most of them started while backward is still being recorded.
        tr.data_parallel(Arc::new(Solo), zero, 1024).unwrap();
        let (steps, w) = run(&mut tr);
        assert_eq!(steps, plain, "zero = {zero}");
        assert_eq!(checksum(&w), checksum(&plain_w), "zero = {zero}");
        let m = tr.step().unwrap();
        let comm = m.comm.expect("a data-parallel step reports its communication");
        let params: usize = tr.model.params.iter().map(|p| p.grad.numel()).sum();
        assert_eq!(comm.bytes, params as u64 * 4);
        assert!(comm.buckets > 10, "{comm:?}");
    }
}

/// A job whose other rank reports another checksum.
struct Diverged;

impl Collective for Diverged {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        3
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        Ok(vec![value, value, value ^ 1])
    }
    fn all_gather_f32(&self, mine: &[f32], _: &[usize]) -> Result<Vec<f32>> {
        Ok(mine.to_vec())
    }
}

#[test]
fn replica_check_names_the_rank_that_diverged() {
    let w = vec![HostTensor::new("h.0.attn.c_attn.weight", vec![2], vec![1.0, -0.5])];
    verify_replicas(&Solo, &w, 4).unwrap();
    let e = verify_replicas(&Diverged, &w, 4).unwrap_err().to_string();
    assert!(e.contains("rank 2") && !e.contains("rank 1 (") && e.contains("step 4"), "{e}");
    // The checksum sees one flipped bit, and a reshape.
    let mut flipped = w.clone();
    flipped[0].data[1] = f32::from_bits(flipped[0].data[1].to_bits() ^ 1);
    assert_ne!(checksum(&w), checksum(&flipped));
    let mut reshaped = w.clone();
    reshaped[0].shape = vec![1, 2];
    assert_ne!(checksum(&w), checksum(&reshaped));
}
