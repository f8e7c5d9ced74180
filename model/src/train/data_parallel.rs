//! Data parallelism: every rank holds the whole model, trains on its own slice of each global batch, and the
//! gradients are summed over ranks before the (identical) optimizer step. Gradients travel in buckets of a few MiB
//! (flat f32, parameters in reverse order, which is roughly the order backward finishes them). A bucket's
//! readback is submitted the moment its last parameter's gradient kernels are recorded, and a communication
//! thread waits for that submission alone, sums the bucket over ranks and hands it back, so the all-reduce of one
//! bucket runs while the GPU computes the rest of the backward. Buckets are reduced in a fixed order on every
//! rank (MPI collectives must match), whatever order backward finishes them in.

use std::collections::HashMap;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use kiln_engine::autograd::Param;
use kiln_engine::{Gpu, PendingRead, Readback};

use crate::arch::Model;
use crate::checkpoint::HostTensor;
use crate::error::{ModelError, Result};
use crate::train::collective::Collective;
use crate::train::optim::Optimizer;

/// Default bucket size: big enough that per-message latency is small, small enough to start early.
pub const BUCKET_BYTES: usize = 4 << 20;

struct Bucket {
    /// Indices into the model's parameter list, in the order their gradients are packed.
    params: Vec<usize>,
    elems: usize,
    readback: Readback,
}

/// What the gradient exchange of one step cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CommStats {
    /// Bytes of gradients each rank sent into the all-reduce.
    pub bytes: u64,
    /// Time the communication thread spent in all-reduce calls.
    pub comm_ms: f64,
    /// Communication left after the GPU finished the backward (from the moment the last bucket's gradients
    /// were read back to the end of the last all-reduce): what overlapping did not hide.
    pub exposed_ms: f64,
    /// Fraction of `comm_ms` hidden behind the backward: 1 − exposed / comm.
    pub overlap: f64,
    /// Time the training thread waited after recording its backward, for the GPU to finish it and for the
    /// reduced gradients.
    pub wait_ms: f64,
    pub buckets: usize,
}

impl CommStats {
    /// Two exchanges as one (an RL step's passes): times and bytes add up, the overlap is recomputed.
    pub fn merge(self, o: CommStats) -> CommStats {
        let comm_ms = self.comm_ms + o.comm_ms;
        let exposed_ms = self.exposed_ms + o.exposed_ms;
        CommStats {
            bytes: self.bytes + o.bytes,
            comm_ms,
            exposed_ms,
            overlap: if comm_ms > 0.0 { (1.0 - exposed_ms / comm_ms).max(0.0) } else { 0.0 },
            wait_ms: self.wait_ms + o.wait_ms,
            buckets: self.buckets + o.buckets,
        }
    }
}

/// One reduced bucket as the communication thread hands it back.
struct Reduced {
    bucket: usize,
    data: Vec<f32>,
    /// When its gradients had been read back (the GPU had run the backward up to them).
    read: Instant,
    reduce_ms: f64,
    done: Instant,
}

/// The gradient all-reduce of one model over one group of ranks.
pub struct GradSync {
    comm: Arc<dyn Collective>,
    buckets: Vec<Bucket>,
    /// Parameter address → its bucket, for the backward hook.
    index: HashMap<usize, usize>,
}

impl GradSync {
    /// Buckets of at most `bucket_bytes` (a parameter larger than that is a bucket of its own) over `params`.
    pub fn new(gpu: &Gpu, comm: Arc<dyn Collective>, params: &[Param], bucket_bytes: usize) -> Result<GradSync> {
        let limit = (bucket_bytes / 4).max(1);
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut filled = 0;
        for i in (0..params.len()).rev() {
            let n = params[i].grad.numel();
            if groups.is_empty() || (filled + n > limit && filled > 0) {
                groups.push(Vec::new());
                filled = 0;
            }
            groups.last_mut().expect("pushed above").push(i);
            filled += n;
        }
        let mut buckets = Vec::with_capacity(groups.len());
        let mut index = HashMap::new();
        for (b, group) in groups.into_iter().enumerate() {
            let elems = group.iter().map(|&i| params[i].grad.numel()).sum();
            for &i in &group {
                index.insert(&params[i] as *const Param as usize, b);
            }
            buckets.push(Bucket { params: group, elems, readback: gpu.readback_buffer(elems)? });
        }
        Ok(GradSync { comm, buckets, index })
    }

    /// What a trainer does to join `comm`: gradient buckets over `model`'s parameters and, with `zero`, `opt`'s
    /// moments sharded over the ranks.
    pub fn attach(
        gpu: &Gpu,
        comm: Arc<dyn Collective>,
        model: &Model,
        opt: &mut Optimizer,
        zero: bool,
        bucket_bytes: usize,
    ) -> Result<GradSync> {
        let sync = GradSync::new(gpu, comm.clone(), &model.params, bucket_bytes)?;
        if zero {
            opt.shard(gpu, model, comm)?;
        }
        Ok(sync)
    }

    pub fn comm(&self) -> &dyn Collective {
        self.comm.as_ref()
    }

    pub fn ranks(&self) -> usize {
        self.comm.size()
    }

    /// Run `backward` (which must call the hook it is given for every parameter whose gradient becomes final,
    /// e.g. `Tape::backward_with`), all-reducing bucket by bucket as they complete, and write the sums back into
    /// the parameters' gradients (recorded in order: the optimizer step that follows reads them).
    pub fn backward_and_reduce<'p>(
        &self,
        gpu: &Gpu,
        params: &'p [Param],
        backward: impl FnOnce(&mut dyn FnMut(&'p Param) -> kiln_engine::Result<()>) -> Result<()>,
    ) -> Result<CommStats> {
        let nb = self.buckets.len();
        let mut stats = CommStats { buckets: nb, ..CommStats::default() };
        let (to_comm, from_main) = channel::<(usize, PendingRead)>();
        let (to_main, from_comm) = channel::<Result<Reduced>>();
        let comm = self.comm.as_ref();
        let reduced: Result<Vec<Vec<f32>>> = std::thread::scope(|s| {
            // Owned by this closure, so an early return (an error) closes the channel and ends the thread.
            let to_comm = to_comm;
            s.spawn(move || {
                // Reduce in bucket order on every rank; a bucket that finished early waits in `ready`.
                let mut ready: HashMap<usize, PendingRead> = HashMap::new();
                for b in 0..nb {
                    while !ready.contains_key(&b) {
                        match from_main.recv() {
                            Ok((k, p)) => {
                                ready.insert(k, p);
                            }
                            Err(_) => return, // the training thread failed; it reports why
                        }
                    }
                    let pending = ready.remove(&b).expect("checked above");
                    let result = pending.wait(gpu).map_err(ModelError::from).and_then(|mut data| {
                        let read = Instant::now();
                        comm.all_reduce_sum(&mut data)?;
                        let done = Instant::now();
                        let reduce_ms = (done - read).as_secs_f64() * 1e3;
                        Ok(Reduced { bucket: b, data, read, reduce_ms, done })
                    });
                    let failed = result.is_err();
                    if to_main.send(result).is_err() || failed {
                        return;
                    }
                }
            });
            let mut remaining: Vec<usize> = self.buckets.iter().map(|b| b.params.len()).collect();
            let mut started = vec![false; nb];
            let mut last_started = 0;
            let mut start = |b: usize, started: &mut Vec<bool>| -> kiln_engine::Result<()> {
                let grads: Vec<&kiln_engine::Tensor> =
                    self.buckets[b].params.iter().map(|&i| &params[i].grad).collect();
                let pending = gpu.start_read(&self.buckets[b].readback, &grads)?;
                started[b] = true;
                last_started = b;
                // A closed channel means the communication thread stopped on an error it has sent.
                let _ = to_comm.send((b, pending));
                Ok(())
            };
            let mut hook = |p: &'p Param| -> kiln_engine::Result<()> {
                if let Some(&b) = self.index.get(&(p as *const Param as usize)) {
                    remaining[b] -= 1;
                    if remaining[b] == 0 {
                        start(b, &mut started)?;
                    }
                }
                Ok(())
            };
            backward(&mut hook)?;
            // Buckets holding a parameter the loss never used (its gradient is whatever it was: zero).
            for b in 0..nb {
                if !started[b] {
                    start(b, &mut started)?;
                }
            }
            let waited = Instant::now();
            let mut out: Vec<Vec<f32>> = vec![Vec::new(); nb];
            let (mut gpu_done, mut all_done) = (waited, waited);
            for _ in 0..nb {
                let r = from_comm
                    .recv()
                    .map_err(|_| ModelError::Data("the gradient communication thread stopped".into()))??;
                stats.comm_ms += r.reduce_ms;
                if r.bucket == last_started {
                    gpu_done = r.read;
                }
                all_done = all_done.max(r.done);
                out[r.bucket] = r.data;
            }
            stats.wait_ms = waited.elapsed().as_secs_f64() * 1e3;
            stats.exposed_ms = all_done.saturating_duration_since(gpu_done).as_secs_f64() * 1e3;
            stats.overlap = if stats.comm_ms > 0.0 { (1.0 - stats.exposed_ms / stats.comm_ms).max(0.0) } else { 0.0 };
            Ok(out)
        });
        for (bucket, data) in self.buckets.iter().zip(reduced?) {
            let mut at = 0;
            for &i in &bucket.params {
                let n = params[i].grad.numel();
                gpu.write(&params[i].grad, &data[at..at + n])?;
                at += n;
            }
            stats.bytes += (bucket.elems * 4) as u64;
        }
        Ok(stats)
    }
}

/// A checksum of host tensors' exact bits (names, shapes and values).
pub fn checksum(tensors: &[HostTensor]) -> u64 {
    let mut h = crc32fast::Hasher::new();
    let mut n = 0u64;
    for t in tensors {
        h.update(t.name.as_bytes());
        for &d in &t.shape {
            h.update(&(d as u64).to_le_bytes());
        }
        h.update(bytemuck::cast_slice(&t.data));
        n += t.data.len() as u64;
    }
    (h.finalize() as u64) << 32 | (n & 0xffff_ffff)
}

/// Error unless every rank holds the same `tensors` (the parameters after a step): data parallelism keeps them
/// identical, so a difference means a rank diverged (a different binary, adapter bug, or lost update).
pub fn verify_replicas(comm: &dyn Collective, tensors: &[HostTensor], step: u64) -> Result<()> {
    let sums = comm.all_gather_u64(checksum(tensors))?;
    let differ: Vec<String> =
        sums.iter().enumerate().filter(|(_, &s)| s != sums[0]).map(|(r, s)| format!("rank {r} ({s:016x})")).collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(ModelError::Data(format!(
        "the ranks' parameters differ at step {step}: rank 0 has checksum {:016x}, {} — data-parallel replicas must \
         stay identical; check that every rank runs the same kiln build on the same kind of adapter",
        sums[0],
        differ.join(", ")
    )))
}

#[cfg(test)]
#[path = "data_parallel_tests.rs"]
mod tests;
