//! The GPU context: adapter choice, device with the adapter's own limits, tensor memory and readback.
//! Every wgpu call that tends to change between releases lives here or in `launch.rs`/`profiler.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::launch::{Caches, Recorder};
use crate::pool::{MemoryKind, Pool, PoolStats};
use crate::tensor::{Storage, Tensor};
use crate::{DType, Error, Result};
use std::sync::atomic::AtomicU8;

/// Optional features Kiln uses when present; `IMMEDIATES` (push constants) is required: every kernel takes its
/// sizes that way, so launching needs no uniform buffer and no per-dispatch allocation.
fn wanted_features() -> wgpu::Features {
    wgpu::Features::IMMEDIATES
        | wgpu::Features::TIMESTAMP_QUERY
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
        | wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP
        | wgpu::Features::SUBGROUP_BARRIER
}

/// What `kiln devices` prints about one adapter.
#[derive(Clone, Debug)]
pub struct AdapterReport {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub max_storage_binding: u64,
    pub max_buffer: u64,
    pub max_workgroup_memory: u32,
    pub max_invocations: u32,
    pub max_workgroups_per_dim: u32,
    pub max_immediates: u32,
    pub subgroup_sizes: (u32, u32),
    pub features: Vec<&'static str>,
    /// The adapter's key in the matmul autotune cache.
    pub tuning_key: String,
}

fn report(adapter: &wgpu::Adapter) -> AdapterReport {
    let info = adapter.get_info();
    let limits = adapter.limits();
    let f = adapter.features();
    let named = [
        (wgpu::Features::IMMEDIATES, "immediates"),
        (wgpu::Features::TIMESTAMP_QUERY, "timestamp-query"),
        (wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES, "timestamp-in-passes"),
        (wgpu::Features::SHADER_F16, "shader-f16"),
        (wgpu::Features::SUBGROUP, "subgroups"),
        (wgpu::Features::SHADER_F64, "shader-f64"),
        (wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX, "cooperative-matrix"),
    ];
    AdapterReport {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: info.driver.clone(),
        driver_info: info.driver_info.clone(),
        max_storage_binding: limits.max_storage_buffer_binding_size,
        max_buffer: limits.max_buffer_size,
        max_workgroup_memory: limits.max_compute_workgroup_storage_size,
        max_invocations: limits.max_compute_invocations_per_workgroup,
        max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
        max_immediates: limits.max_immediate_size,
        subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
        features: named.iter().filter(|(bit, _)| f.contains(*bit)).map(|(_, n)| *n).collect(),
        tuning_key: crate::ops::matmul_tune::adapter_key(&info),
    }
}

fn instance() -> wgpu::Instance {
    // `with_env` honours WGPU_BACKEND (e.g. `vulkan`, `metal`, `dx12`) for users who want to force one.
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::PRIMARY;
    wgpu::Instance::new(desc.with_env())
}

fn adapters() -> Vec<wgpu::Adapter> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()))
}

/// Every adapter wgpu can see, for `kiln devices`.
pub fn list_adapters() -> Vec<AdapterReport> {
    adapters().iter().map(report).collect()
}

/// Prefer real GPUs over software ones; among equals keep wgpu's order.
fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// The adapter of the `nth` process on a machine (data-parallel ranks): the adapters of the best kind present
/// (e.g. every discrete GPU), in wgpu's order, taken round-robin, so ranks spread over the GPUs and share them
/// when there are more ranks than GPUs (several ranks on one lavapipe, say).
fn pick_nth_adapter(nth: usize) -> Result<wgpu::Adapter> {
    let mut all = adapters();
    if all.is_empty() {
        return Err(Error::NoAdapter { detail: "wgpu enumerated no Vulkan, Metal or DX12 adapter".into() });
    }
    all.sort_by_key(|a| rank(a.get_info().device_type));
    let best = rank(all[0].get_info().device_type);
    all.retain(|a| rank(a.get_info().device_type) == best);
    let n = all.len();
    Ok(all.swap_remove(nth % n))
}

fn pick_adapter(wanted: Option<&str>) -> Result<wgpu::Adapter> {
    let all = adapters();
    if all.is_empty() {
        return Err(Error::NoAdapter { detail: "wgpu enumerated no Vulkan, Metal or DX12 adapter".into() });
    }
    if let Some(w) = wanted.filter(|w| !w.is_empty()) {
        let lw = w.to_lowercase();
        let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
        return all
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&lw))
            .ok_or_else(|| Error::AdapterNotFound { wanted: w.to_string(), available: names.join(", ") });
    }
    let mut all = all;
    all.sort_by_key(|a| rank(a.get_info().device_type));
    Ok(all.into_iter().next().expect("checked non-empty"))
}

/// The engine's handle on one GPU. Build one per process and share it (it is `Sync`).
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: wgpu::Features,
    pub(crate) pool: Arc<Pool>,
    /// Staging buffers for uploads recorded mid-encoder (never bound to a kernel; see `write_bytes`).
    uploads: Arc<Pool>,
    pub(crate) caches: Caches,
    pub(crate) recorder: Mutex<Recorder>,
    /// Validation errors wgpu reports asynchronously; surfaced as `Error::Gpu` at the next flush.
    pub(crate) gpu_error: Arc<Mutex<Option<String>>>,
    /// Which matmul design each shape class runs, decided once per process (see `ops::matmul_tune`).
    pub(crate) matmul_choices: Mutex<HashMap<&'static str, crate::ops::matmul_tune::Choice>>,
    placeholder: std::sync::OnceLock<Tensor>,
    /// Debug switch: every allocation is filled with NaN, so a kernel that reads memory nobody wrote fails loudly.
    poison: std::sync::atomic::AtomicBool,
    /// A storage-binding size below the adapter's, set by tests so that splitting over bindings is exercised on
    /// small tensors (0 = the adapter's own limit).
    binding_limit: std::sync::atomic::AtomicU64,
}

impl Gpu {
    /// Open the best adapter, or the one whose name contains `KILN_ADAPTER`.
    pub fn new() -> Result<Gpu> {
        Gpu::open(std::env::var("KILN_ADAPTER").ok().as_deref())
    }

    /// The adapter for the `local_rank`-th process of a data-parallel job on this machine: the one named by
    /// `KILN_ADAPTER` if set, else the best adapters taken round-robin by local rank.
    pub fn for_local_rank(local_rank: usize) -> Result<Gpu> {
        match std::env::var("KILN_ADAPTER").ok().filter(|w| !w.is_empty()) {
            Some(w) => Gpu::open(Some(&w)),
            None => Gpu::with_adapter(pick_nth_adapter(local_rank)?),
        }
    }

    /// Open the adapter whose name contains `wanted` (case-insensitive), or the best one for `None`.
    pub fn open(wanted: Option<&str>) -> Result<Gpu> {
        Gpu::with_adapter(pick_adapter(wanted)?)
    }

    fn with_adapter(adapter: wgpu::Adapter) -> Result<Gpu> {
        let info = adapter.get_info();
        let missing = wgpu::Features::IMMEDIATES - adapter.features();
        if !missing.is_empty() {
            return Err(Error::MissingFeature {
                adapter: info.name.clone(),
                feature: "immediates (push constants)",
                why: "kernels receive their sizes as immediates",
            });
        }
        let features = adapter.features() & wanted_features();
        // The adapter's own limits, never WebGPU's defaults: a real GPU's storage bindings are far above 128 MiB.
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("kiln"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| Error::Device { adapter: info.name.clone(), reason: e.to_string() })?;
        let gpu_error = Arc::new(Mutex::new(None::<String>));
        let sink = gpu_error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = sink.lock().unwrap();
            if slot.is_none() {
                *slot = Some(e.to_string());
            }
        }));
        let recorder = Mutex::new(Recorder::new(&device, &queue, features));
        let gpu = Gpu {
            device,
            queue,
            info,
            limits,
            features,
            pool: Pool::new(),
            uploads: Pool::new(),
            caches: Caches::default(),
            recorder,
            gpu_error,
            matmul_choices: Mutex::new(HashMap::new()),
            placeholder: std::sync::OnceLock::new(),
            poison: std::sync::atomic::AtomicBool::new(false),
            binding_limit: std::sync::atomic::AtomicU64::new(0),
        };
        // Made now rather than on first use, so it never shows up as a step's allocation.
        gpu.placeholder()?;
        Ok(gpu)
    }

    pub fn adapter_name(&self) -> &str {
        &self.info.name
    }

    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// The largest storage binding a kernel may be given, in bytes: the adapter's `max_storage_buffer_binding_size`
    /// unless a test lowered it with [`Gpu::set_binding_limit`]. Tensors above it are processed in parts
    /// ([`Gpu::split_rows`]).
    pub fn max_binding(&self) -> u64 {
        let own = self.limits.max_storage_buffer_binding_size;
        match self.binding_limit.load(std::sync::atomic::Ordering::Relaxed) {
            0 => own,
            l => l.min(own),
        }
    }

    /// Pretend the adapter's binding limit is `bytes` (None: its real limit), so the code paths of tensors larger
    /// than one binding run on small shapes. Only lowers; values above the adapter's limit have no effect.
    pub fn set_binding_limit(&self, bytes: Option<u64>) {
        self.binding_limit.store(bytes.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// Row ranges (r0, r1) covering `rows` rows of `row_elems` 4-byte elements each, every range within one
    /// storage binding and starting at an aligned byte offset, so each can be bound as a view. One range when the
    /// whole tensor fits. An error names the limit when even the smallest aligned group of rows does not fit.
    pub fn split_rows(&self, op: &'static str, rows: usize, row_elems: usize) -> Result<Vec<(usize, usize)>> {
        let row_bytes = (row_elems * 4) as u64;
        let max = self.max_binding();
        if rows as u64 * row_bytes <= max {
            return Ok(vec![(0, rows)]);
        }
        let align = self.limits.min_storage_buffer_offset_alignment as u64;
        // Ranges start at multiples of `step` rows, so every start is at a multiple of `align` bytes.
        let step = align / gcd(align, row_bytes);
        let per = (max / row_bytes) / step * step;
        if per == 0 {
            return Err(self.limit_error(
                op,
                "an aligned group of rows",
                step * row_bytes,
                max,
                "max_storage_buffer_binding_size",
            ));
        }
        let per = per as usize;
        Ok((0..rows).step_by(per).map(|r0| (r0, (r0 + per).min(rows))).collect())
    }

    pub fn features(&self) -> wgpu::Features {
        self.features
    }

    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    pub fn has_subgroups(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
    }

    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
    }

    pub fn report(&self) -> String {
        format!(
            "{} ({:?}, {:?}, driver {} {})",
            self.info.name, self.info.backend, self.info.device_type, self.info.driver, self.info.driver_info
        )
    }

    // ---- memory -------------------------------------------------------------------------------------------

    /// A tensor with unspecified contents (a reused buffer keeps old values; fresh ones are zero).
    pub fn alloc(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.alloc_kind(shape, dtype, MemoryKind::Activations)
    }

    /// [`Gpu::alloc`] counted as `kind` in the pool's memory split (the classifier's scratch, say).
    pub fn alloc_kind(&self, shape: &[usize], dtype: DType, kind: MemoryKind) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if shape.is_empty() || numel == 0 {
            return Err(Error::Empty { op: "alloc", what: "tensor", shape: shape.to_vec() });
        }
        let bytes = (numel as u64).saturating_mul(dtype.size() as u64);
        if bytes > self.limits.max_buffer_size {
            return Err(self.limit_error("alloc", "tensor", bytes, self.limits.max_buffer_size, "max_buffer_size"));
        }
        let device = &self.device;
        let (id, class_bytes, buffer) = self.pool.take(bytes, kind, |size| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kiln tensor"),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        let storage =
            Storage { buffer: Some(buffer), id, class_bytes, pool: self.pool.clone(), kind: AtomicU8::new(kind as u8) };
        let t = Tensor::new(Arc::new(storage), shape.to_vec(), dtype);
        if self.poison.load(std::sync::atomic::Ordering::Relaxed) {
            let nan = vec![f32::NAN; numel];
            self.write_bytes(&t, bytemuck::cast_slice(&nan), numel)?;
        }
        Ok(t)
    }

    /// Fill every new allocation with NaN (tests and bug hunts: slow, it submits per allocation).
    pub fn set_poison_allocations(&self, on: bool) {
        self.poison.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        let t = self.alloc(shape, DType::F32)?;
        self.write(&t, data)?;
        Ok(t)
    }

    pub fn upload_i32(&self, data: &[i32], shape: &[usize]) -> Result<Tensor> {
        let t = self.alloc(shape, DType::I32)?;
        self.write_i32(&t, data)?;
        Ok(t)
    }

    /// Overwrite a tensor's contents from the host (no allocation: steady-state steps refill inputs this way).
    pub fn write(&self, t: &Tensor, data: &[f32]) -> Result<()> {
        expect_dtype("write", "tensor", t, DType::F32)?;
        self.write_bytes(t, bytemuck::cast_slice(data), data.len())
    }

    pub fn write_i32(&self, t: &Tensor, data: &[i32]) -> Result<()> {
        expect_dtype("write_i32", "tensor", t, DType::I32)?;
        self.write_bytes(t, bytemuck::cast_slice(data), data.len())
    }

    fn write_bytes(&self, t: &Tensor, bytes: &[u8], len: usize) -> Result<()> {
        if len != t.numel() {
            return Err(Error::Shape {
                op: "write",
                what: "host data",
                expected: format!("{} values for shape {:?}", t.numel(), t.shape()),
                got: format!("{len} values"),
            });
        }
        let mut rec = self.recorder.lock().unwrap();
        if !rec.is_recording() {
            self.queue.write_buffer(t.buffer(), t.byte_offset(), bytes);
            return Ok(());
        }
        // A queued write runs before every command recorded but not yet submitted, and `t`'s buffer may still be
        // read by one of them (buffers are reused across tensors). So the data goes to a staging buffer that no
        // kernel ever binds, and a copy recorded in order moves it into place: the step stays one submission.
        let device = &self.device;
        let (id, class_bytes, buffer) = self.uploads.take(bytes.len() as u64, MemoryKind::Scratch, |size| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kiln upload staging"),
                size,
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        self.queue.write_buffer(&buffer, 0, bytes);
        rec.encoder(device).copy_buffer_to_buffer(&buffer, 0, t.buffer(), t.byte_offset(), bytes.len() as u64);
        let kind = AtomicU8::new(MemoryKind::Scratch as u8);
        let storage = Storage { buffer: Some(buffer), id, class_bytes, pool: self.uploads.clone(), kind };
        rec.staging.push(Tensor::new(Arc::new(storage), vec![len], t.dtype()));
        Ok(())
    }

    pub fn read(&self, t: &Tensor) -> Result<Vec<f32>> {
        expect_dtype("read", "tensor", t, DType::F32)?;
        Ok(bytemuck::cast_slice(&self.read_bytes(t)?).to_vec())
    }

    pub fn read_i32(&self, t: &Tensor) -> Result<Vec<i32>> {
        expect_dtype("read_i32", "tensor", t, DType::I32)?;
        Ok(bytemuck::cast_slice(&self.read_bytes(t)?).to_vec())
    }

    fn read_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        let size = t.bytes();
        // Readback is outside training steps (the user asked for it), so a fresh staging buffer is acceptable.
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut rec = self.recorder.lock().unwrap();
        rec.encoder(&self.device).copy_buffer_to_buffer(t.buffer(), t.byte_offset(), &staging, 0, size);
        drop(rec);
        self.flush()?;
        let out = self.map_read(&staging, size)?;
        staging.destroy();
        Ok(out)
    }

    pub(crate) fn map_read(&self, buffer: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        buffer.map_async(wgpu::MapMode::Read, 0..size, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Gpu { context: "readback", message: e.to_string() }),
            Err(_) => return Err(Error::Gpu { context: "readback", message: "map callback never ran".into() }),
        }
        let data = buffer
            .get_mapped_range(0..size)
            .map_err(|e| Error::Gpu { context: "readback", message: e.to_string() })?
            .to_vec();
        buffer.unmap();
        Ok(data)
    }

    /// Block until the GPU has finished everything submitted.
    pub(crate) fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu { context: "wait", message: e.to_string() })?;
        self.take_gpu_error("wait")
    }

    pub(crate) fn take_gpu_error(&self, context: &'static str) -> Result<()> {
        match self.gpu_error.lock().unwrap().take() {
            Some(message) => Err(Error::Gpu { context, message }),
            None => Ok(()),
        }
    }

    /// Submit recorded work and wait for it: what benchmarks time.
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        self.wait()
    }

    /// Count `t`'s buffer as `kind` in the memory split from now on (parameters, gradients and optimizer state
    /// are marked once, when made). Views share their buffer's kind.
    pub fn set_kind(&self, t: &Tensor, kind: MemoryKind) {
        let old = t.storage.kind();
        if old != kind {
            t.storage.kind.store(kind as u8, std::sync::atomic::Ordering::Relaxed);
            t.storage.pool.retag(t.storage.class_bytes, old, kind);
        }
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    pub fn reset_peak(&self) {
        self.pool.reset_peak()
    }

    /// Turn buffer reuse off (every tensor gets a fresh buffer) to rule the pool out when hunting a bug.
    pub fn set_buffer_reuse(&self, on: bool) {
        self.pool.set_reuse(on);
        self.caches.forget_bind_groups();
    }

    pub(crate) fn limit_error(
        &self,
        op: &'static str,
        what: &'static str,
        needed: u64,
        limit: u64,
        name: &'static str,
    ) -> Error {
        Error::Limit { op, what, needed, limit, limit_name: name, adapter: self.info.name.clone() }
    }
}

pub(crate) fn expect_dtype(op: &'static str, what: &'static str, t: &Tensor, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::DType { op, what, dtype_expected: dtype, dtype_got: t.dtype() });
    }
    Ok(())
}

impl Gpu {
    /// A one-element buffer bound where a kernel's optional input is absent (a binding always needs a buffer).
    pub(crate) fn placeholder(&self) -> Result<Tensor> {
        if let Some(t) = self.placeholder.get() {
            return Ok(t.clone());
        }
        let t = self.alloc(&[1], DType::F32)?;
        Ok(self.placeholder.get_or_init(|| t).clone())
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
