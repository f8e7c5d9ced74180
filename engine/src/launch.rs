//! Recording kernels: pipelines and bind groups built once and cached, every dispatch validated against the
//! adapter's limits, recorded into one open command encoder that `flush` submits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::profiler::Profiler;
use crate::shaders::ShaderSource;
use crate::{Error, Gpu, Result, Tensor};

/// One kernel launch: which entry point, its buffers in binding order, its sizes (passed as immediates) and the
/// workgroup grid.
pub struct Launch<'a> {
    pub op: &'static str,
    /// Floating-point operations of this launch (0 where not worth counting: row and elementwise kernels), for
    /// the profiler's achieved-GFLOP/s column.
    pub flops: u64,
    pub shader: &'static ShaderSource,
    pub entry: &'static str,
    /// WGSL `override` constants (tile sizes); each distinct set is its own cached pipeline.
    pub overrides: &'a [(&'static str, f64)],
    pub args: &'a [&'a Tensor],
    pub params: &'a [u8],
    pub groups: [u32; 3],
}

type PipelineKey = (&'static str, &'static str, Vec<(&'static str, u64)>);
type BindKey = (u64, Vec<(u64, u64, u64)>);

#[derive(Default)]
pub(crate) struct Caches {
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, (u64, Arc<wgpu::ComputePipeline>)>>,
    bind_groups: Mutex<HashMap<BindKey, wgpu::BindGroup>>,
    next_pipeline_id: AtomicU64,
}

/// Bind groups are cached by buffer identity; the pool hands the same buffers back every step, so the cache stays
/// small in steady state. Past this many entries (tests with many shapes) it is simply cleared.
const MAX_BIND_GROUPS: usize = 4096;

impl Caches {
    pub(crate) fn forget_bind_groups(&self) {
        self.bind_groups.lock().unwrap().clear();
    }

    fn pipeline(&self, device: &wgpu::Device, l: &Launch) -> Result<(u64, Arc<wgpu::ComputePipeline>)> {
        let key: PipelineKey = (l.shader.name, l.entry, l.overrides.iter().map(|(n, v)| (*n, v.to_bits())).collect());
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = {
            let mut modules = self.modules.lock().unwrap();
            let module = modules.entry(l.shader.name).or_insert_with(|| {
                let desc = wgpu::ShaderModuleDescriptor {
                    label: Some(l.shader.name),
                    source: wgpu::ShaderSource::Wgsl(l.shader.source.into()),
                };
                if l.shader.trusted && std::env::var_os("KILN_SHADER_CHECKS").is_none() {
                    // SAFETY: trusted kernels clamp or guard every index themselves and their launchers check
                    // shapes against the bound buffers before dispatch (see `ShaderSource::trusted`).
                    unsafe { device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
                } else {
                    device.create_shader_module(desc)
                }
            });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(l.entry),
                layout: None,
                module,
                entry_point: Some(l.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: l.overrides,
                    // Every kernel writes its workgroup memory before reading it.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            })
        };
        if let Some(e) = pollster::block_on(scope.pop()) {
            self.modules.lock().unwrap().remove(l.shader.name);
            return Err(Error::Gpu {
                context: "shader compilation",
                message: format!("{}::{}: {e}", l.shader.name, l.entry),
            });
        }
        // Ids come from a counter, never from the map's size: two threads may build pipelines at once, and a
        // shared id would let one pipeline's cached bind groups be used with another's layout.
        let id = self.next_pipeline_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut pipelines = self.pipelines.lock().unwrap();
        Ok(pipelines.entry(key).or_insert((id, Arc::new(pipeline))).clone())
    }

    fn bind_group(
        &self,
        device: &wgpu::Device,
        pid: u64,
        pipeline: &wgpu::ComputePipeline,
        args: &[&Tensor],
    ) -> wgpu::BindGroup {
        let key: BindKey = (pid, args.iter().map(|t| (t.buffer_id(), t.byte_offset(), t.bytes())).collect());
        let mut cache = self.bind_groups.lock().unwrap();
        if let Some(bg) = cache.get(&key) {
            return bg.clone();
        }
        if cache.len() >= MAX_BIND_GROUPS {
            cache.clear();
        }
        let entries: Vec<wgpu::BindGroupEntry> = args
            .iter()
            .enumerate()
            .map(|(i, t)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: t.buffer(),
                    offset: t.byte_offset(),
                    size: wgpu::BufferSize::new(t.bytes()),
                }),
            })
            .collect();
        let bg = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        cache.insert(key, bg.clone());
        bg
    }
}

/// The open command encoder: kernels accumulate here until `flush` submits them all at once.
pub(crate) struct Recorder {
    encoder: Option<wgpu::CommandEncoder>,
    pub(crate) profiler: Profiler,
    /// Command buffers submitted and kernels recorded so far (tests and step reports count them).
    pub(crate) submits: u64,
    pub(crate) dispatches: u64,
    /// Staging buffers of uploads recorded into the open encoder; released (to the upload pool) only after the
    /// encoder is submitted, so a later queued write can never land in one before its copy has run.
    pub(crate) staging: Vec<Tensor>,
}

impl Recorder {
    pub(crate) fn new(device: &wgpu::Device, queue: &wgpu::Queue, features: wgpu::Features) -> Recorder {
        Recorder {
            encoder: None,
            profiler: Profiler::new(device, queue, features),
            submits: 0,
            dispatches: 0,
            staging: Vec::new(),
        }
    }

    pub(crate) fn is_recording(&self) -> bool {
        self.encoder.is_some()
    }

    pub(crate) fn encoder(&mut self, device: &wgpu::Device) -> &mut wgpu::CommandEncoder {
        self.encoder.get_or_insert_with(|| device.create_command_encoder(&Default::default()))
    }
}

impl Gpu {
    fn validate(&self, l: &Launch) -> Result<()> {
        let lim = self.limits();
        let max_binding = self.max_binding();
        for t in l.args {
            if t.bytes() > max_binding {
                return Err(self.limit_error(
                    l.op,
                    "a storage binding",
                    t.bytes(),
                    max_binding,
                    "max_storage_buffer_binding_size",
                ));
            }
            let align = lim.min_storage_buffer_offset_alignment as u64;
            if !t.byte_offset().is_multiple_of(align) {
                return Err(Error::Invalid {
                    op: l.op,
                    message: format!(
                        "a view bound at byte {} of its buffer; bindings must start at multiples of {align} \
                         (min_storage_buffer_offset_alignment of {})",
                        t.byte_offset(),
                        self.info().name
                    ),
                });
            }
        }
        for &g in &l.groups {
            if g > lim.max_compute_workgroups_per_dimension {
                return Err(self.limit_error(
                    l.op,
                    "the workgroup grid",
                    g as u64,
                    lim.max_compute_workgroups_per_dimension as u64,
                    "max_compute_workgroups_per_dimension",
                ));
            }
        }
        if l.params.len() as u32 > lim.max_immediate_size {
            return Err(self.limit_error(
                l.op,
                "kernel parameters",
                l.params.len() as u64,
                lim.max_immediate_size as u64,
                "max_immediate_size",
            ));
        }
        Ok(())
    }

    /// Validate and record one kernel into the open encoder. Nothing runs until `flush` (or a readback).
    pub fn dispatch(&self, l: &Launch) -> Result<()> {
        self.validate(l)?;
        if l.groups.contains(&0) {
            return Ok(()); // nothing to do; callers reject empty tensors before this
        }
        let (pid, pipeline) = self.caches.pipeline(&self.device, l)?;
        let bind_group = self.caches.bind_group(&self.device, pid, &pipeline, l.args);
        let wall_clock = self.recorder.lock().unwrap().profiler.wall_clock();
        let work = crate::profiler::Work { flops: l.flops, bytes: l.args.iter().map(|t| t.bytes()).sum() };
        if wall_clock {
            self.sync()?; // time this kernel alone
        }
        let start = std::time::Instant::now();
        {
            let mut rec = self.recorder.lock().unwrap();
            rec.dispatches += 1;
            let Recorder { encoder, profiler, .. } = &mut *rec;
            let enc = encoder.get_or_insert_with(|| self.device.create_command_encoder(&Default::default()));
            let timestamp_writes = profiler.next_pass(l.entry, work);
            let mut pass =
                enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(l.entry), timestamp_writes });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            if !l.params.is_empty() {
                pass.set_immediates(0, l.params);
            }
            pass.dispatch_workgroups(l.groups[0], l.groups[1], l.groups[2]);
        }
        if wall_clock {
            self.sync()?;
            self.recorder.lock().unwrap().profiler.add_wall(l.entry, start.elapsed(), work);
        } else if self.recorder.lock().unwrap().profiler.full() {
            self.flush()?;
        }
        Ok(())
    }

    /// Record a copy of `n` elements from `src[src_at..]` to `dst[dst_at..]` into the open encoder (ordered with the
    /// kernels around it, unlike a queued write).
    pub fn copy_elements(&self, src: &Tensor, src_at: usize, dst: &Tensor, dst_at: usize, n: usize) -> Result<()> {
        if src.dtype() != dst.dtype() || src_at + n > src.numel() || dst_at + n > dst.numel() {
            return Err(Error::Invalid {
                op: "copy_elements",
                message: format!(
                    "{n} elements from {src_at} of {:?} {:?} to {dst_at} of {:?} {:?}",
                    src.dtype(),
                    src.shape(),
                    dst.dtype(),
                    dst.shape()
                ),
            });
        }
        let size = (n * src.dtype().size()) as u64;
        let (so, dof) = (
            src.byte_offset() + (src_at * src.dtype().size()) as u64,
            dst.byte_offset() + (dst_at * dst.dtype().size()) as u64,
        );
        self.recorder.lock().unwrap().encoder(&self.device).copy_buffer_to_buffer(
            src.buffer(),
            so,
            dst.buffer(),
            dof,
            size,
        );
        Ok(())
    }

    /// (command buffers submitted, kernels recorded) since the device was opened.
    pub fn submit_counts(&self) -> (u64, u64) {
        let rec = self.recorder.lock().unwrap();
        (rec.submits, rec.dispatches)
    }

    /// Submit everything recorded so far as one command buffer (does not wait).
    pub fn flush(&self) -> Result<()> {
        self.submit().map(|_| ())
    }

    /// `flush`, returning the submission's index (None when nothing was recorded) so a caller can wait for it alone.
    pub(crate) fn submit(&self) -> Result<Option<wgpu::SubmissionIndex>> {
        let mut rec = self.recorder.lock().unwrap();
        let mut index = None;
        if let Some(mut enc) = rec.encoder.take() {
            let resolved = rec.profiler.resolve(&mut enc);
            index = Some(self.queue.submit([enc.finish()]));
            rec.submits += 1;
            rec.staging.clear();
            if let Some((buffer, size)) = resolved {
                let bytes = self.map_read(&buffer, size)?;
                rec.profiler.accumulate(&bytes);
            }
        }
        drop(rec);
        self.take_gpu_error("flush")?;
        Ok(index)
    }
}
