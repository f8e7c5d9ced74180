//! What data-parallel training needs from the processes it runs on: a rank, a world size, and a few collectives
//! over host memory. The `kiln` command implements it over MPI (feature `mpi`); this crate never links MPI, so the
//! default build needs none. Every rank must call the collectives in the same order with the same lengths.

use crate::error::Result;

/// The ranks of one training job.
pub trait Collective: Send + Sync {
    /// This process's rank, 0-based; rank 0 writes checkpoints, metrics and progress.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum over ranks, in place: every rank ends with the same sums.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;
    /// The same for f64 (metrics summed over ranks).
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()>;
    /// Every rank's `value`, in rank order, on every rank.
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>>;
    /// The concatenation of every rank's `mine` in rank order, on every rank; `counts[r]` is rank r's length.
    fn all_gather_f32(&self, mine: &[f32], counts: &[usize]) -> Result<Vec<f32>>;
}

/// Who this process is in the job: rank `rank` of `size` (1 of 1 without a collective).
pub fn rank_of(comm: Option<&dyn Collective>) -> (usize, usize) {
    comm.map_or((0, 1), |c| (c.rank(), c.size()))
}

/// A one-rank collective: every collective is the identity. Tests and single-process runs use it where a
/// collective is required; `kiln` passes none at all when it runs alone.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        Ok(vec![value])
    }
    fn all_gather_f32(&self, mine: &[f32], _: &[usize]) -> Result<Vec<f32>> {
        Ok(mine.to_vec())
    }
}
