//! The job this process is part of: alone, or one rank of `mpirun -np N kiln …` (built with `--features mpi`).
//! MPI is initialised only when a launcher started us, so a plain `kiln pretrain` never needs an MPI runtime;
//! a launch of several ranks of a build without the feature is refused rather than run N independent jobs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use kiln_model::train::collective::Collective;
use kiln_model::train::driver::{Progress, Quiet};

use crate::progress::Bar;

static QUIET: AtomicBool = AtomicBool::new(false);

/// Whether this process is a rank other than 0 (which print nothing but errors).
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// A training command's job: the world and how it shards the optimizer.
#[derive(Clone, Copy)]
pub struct Job<'w> {
    pub world: &'w World,
    pub zero: bool,
    pub bucket_bytes: usize,
}

impl<'w> Job<'w> {
    pub fn new(world: &'w World, zero: u8, bucket_mib: f64) -> Result<Job<'w>> {
        if !(bucket_mib > 0.0 && bucket_mib <= 4096.0) {
            bail!("--bucket-mib must be in (0, 4096], got {bucket_mib}");
        }
        Ok(Job { world, zero: zero == 1, bucket_bytes: (bucket_mib * (1 << 20) as f64) as usize })
    }

    /// A process training on its own.
    pub fn alone(world: &'w World) -> Job<'w> {
        Job { world, zero: false, bucket_bytes: kiln_model::train::data_parallel::BUCKET_BYTES }
    }

    pub fn is_root(&self) -> bool {
        self.world.rank == 0
    }

    /// The progress display: a bar on rank 0, nothing elsewhere.
    pub fn progress(&self, label: &str) -> Box<dyn Progress> {
        if self.is_root() {
            Box::new(Bar::new(label))
        } else {
            Box::new(Quiet)
        }
    }
}

/// This process's place in the job.
pub struct World {
    /// None alone (and for a job of one rank: nothing to exchange).
    pub comm: Option<Arc<dyn Collective>>,
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<Arc<mpi_impl::Mpi>>,
}

/// The world size a launcher announced in the environment (Open MPI, MPICH/Hydra, Intel MPI, PMIx), if any.
fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .and_then(|s| s.trim().parse().ok())
}

impl World {
    /// A process on its own.
    pub fn alone() -> World {
        World {
            comm: None,
            rank: 0,
            size: 1,
            local_rank: 0,
            #[cfg(feature = "mpi")]
            mpi: None,
        }
    }

    /// Find out (initialising MPI if a launcher started several ranks).
    pub fn init() -> Result<World> {
        match launched_size() {
            None | Some(0) | Some(1) => Ok(World::alone()),
            #[cfg(feature = "mpi")]
            Some(_) => {
                let w = mpi_impl::init()?;
                QUIET.store(w.rank != 0, Ordering::Relaxed);
                Ok(w)
            }
            #[cfg(not(feature = "mpi"))]
            Some(n) => bail!(
                "started as one of {n} MPI ranks, but this kiln was built without MPI: build it with \
                 `cargo build --release --features mpi` (after `tools/setup.sh --mpi`) for data-parallel training"
            ),
        }
    }

    /// End the whole job after an error on this rank: with several ranks, the others would wait for it forever.
    pub fn abort(&self, message: &str) {
        if self.size > 1 {
            eprintln!("error on rank {} of {}: {message}", self.rank, self.size);
            #[cfg(feature = "mpi")]
            if let Some(m) = &self.mpi {
                m.abort(1);
            }
        } else {
            eprintln!("error: {message}");
        }
    }
}

/// Refuse a command that does not train data-parallel when several ranks run it (each would do the same work
/// and write the same files).
pub fn alone(world: &World, command: &str) -> Result<()> {
    if world.size > 1 {
        bail!(
            "`kiln {command}` runs in one process; only pretrain, sft and rl train data-parallel (started with {} \
             ranks)",
            world.size
        );
    }
    Ok(())
}

#[cfg(feature = "mpi")]
mod mpi_impl {
    use std::sync::{Arc, Mutex};

    use anyhow::{bail, Result};
    use kiln_model::train::collective::Collective;
    use mpi::collective::SystemOperation;
    use mpi::datatype::PartitionMut;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use mpi::Count;

    use super::World;

    /// The MPI world. Kiln calls MPI from the training thread and from the gradient thread, never at once (the
    /// mutex), so MPI_THREAD_SERIALIZED suffices.
    pub struct Mpi {
        world: Mutex<SimpleCommunicator>,
        rank: usize,
        size: usize,
        // Finalises MPI when the world is dropped at the end of `main`.
        _universe: mpi::environment::Universe,
    }

    // SAFETY: the communicator is a handle that MPI lets any thread use under MPI_THREAD_SERIALIZED or better
    // (checked in `init`); every use goes through the mutex, so no two threads are ever inside MPI together.
    unsafe impl Send for Mpi {}
    unsafe impl Sync for Mpi {}

    pub fn init() -> Result<World> {
        let Some((universe, level)) = mpi::initialize_with_threading(mpi::Threading::Serialized) else {
            bail!("MPI was already initialised");
        };
        if level < mpi::Threading::Serialized {
            bail!("this MPI library gives threading level {level:?}; Kiln needs MPI_THREAD_SERIALIZED or better");
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        // Ranks on the same machine, to spread them over its GPUs.
        let local_rank = world.split_shared(world.rank()).rank() as usize;
        let mpi = Arc::new(Mpi { world: Mutex::new(world), rank, size, _universe: universe });
        Ok(World { comm: Some(Arc::new(MpiComm(mpi.clone()))), rank, size, local_rank, mpi: Some(mpi) })
    }

    impl Mpi {
        pub fn abort(&self, code: i32) {
            // Ends every rank of the job (mpirun prints which one called it).
            match self.world.try_lock() {
                Ok(world) => world.abort(code),
                // The gradient thread is inside MPI: exiting without finalising ends the job just as well.
                Err(_) => std::process::exit(code),
            }
        }
    }

    struct MpiComm(Arc<Mpi>);

    fn counts_displs(counts: &[usize]) -> (Vec<Count>, Vec<Count>) {
        let c: Vec<Count> = counts.iter().map(|&n| n as Count).collect();
        let d: Vec<Count> = c.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
        (c, d)
    }

    impl Collective for MpiComm {
        fn rank(&self) -> usize {
            self.0.rank
        }
        fn size(&self) -> usize {
            self.0.size
        }
        fn all_reduce_sum(&self, data: &mut [f32]) -> kiln_model::Result<()> {
            let send = data.to_vec();
            self.0.world.lock().unwrap().all_reduce_into(&send[..], data, SystemOperation::sum());
            Ok(())
        }
        fn all_reduce_sum_f64(&self, data: &mut [f64]) -> kiln_model::Result<()> {
            let send = data.to_vec();
            self.0.world.lock().unwrap().all_reduce_into(&send[..], data, SystemOperation::sum());
            Ok(())
        }
        fn all_gather_u64(&self, value: u64) -> kiln_model::Result<Vec<u64>> {
            let mut out = vec![0u64; self.0.size];
            self.0.world.lock().unwrap().all_gather_into(&value, &mut out[..]);
            Ok(out)
        }
        fn all_gather_f32(&self, mine: &[f32], counts: &[usize]) -> kiln_model::Result<Vec<f32>> {
            let mut out = vec![0f32; counts.iter().sum()];
            let (c, d) = counts_displs(counts);
            let mut part = PartitionMut::new(&mut out[..], &c[..], &d[..]);
            self.0.world.lock().unwrap().all_gather_varcount_into(mine, &mut part);
            Ok(out)
        }
    }
}
