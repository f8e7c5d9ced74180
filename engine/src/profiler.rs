//! Per-kernel GPU time: timestamp queries around each kernel's compute pass where the adapter has them, otherwise
//! wall clock around a synchronous launch (slower, still per kernel).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::Gpu;

/// Accumulated time of one kernel entry point, with the work its launches declared.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub name: &'static str,
    pub calls: u64,
    pub total_ms: f64,
    /// FLOPs the launches declared (0 for kernels that do not count theirs).
    pub flops: u64,
    /// Bytes of every buffer bound to the launches: what a kernel that reads each input and writes each output
    /// once moves (the ideal traffic, a lower bound for the real one).
    pub bytes: u64,
}

/// What one launch adds to its kernel's totals.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Work {
    pub(crate) flops: u64,
    pub(crate) bytes: u64,
}

#[derive(Default)]
struct Totals {
    calls: u64,
    ms: f64,
    flops: u64,
    bytes: u64,
}

impl Totals {
    fn add(&mut self, ms: f64, w: Work) {
        self.calls += 1;
        self.ms += ms;
        self.flops += w.flops;
        self.bytes += w.bytes;
    }
}

/// Passes timed per command buffer; a full set triggers a flush.
const MAX_PASSES: u32 = 512;

struct Timestamps {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    period_ns: f64,
}

pub(crate) struct Profiler {
    enabled: bool,
    timestamps: Option<Timestamps>,
    pending: Vec<(&'static str, Work)>,
    totals: BTreeMap<&'static str, Totals>,
}

impl Profiler {
    pub(crate) fn new(device: &wgpu::Device, queue: &wgpu::Queue, features: wgpu::Features) -> Profiler {
        let ts = features.contains(wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);
        let timestamps = ts.then(|| {
            let bytes = MAX_PASSES as u64 * 2 * 8;
            let buf = |label, usage| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: bytes,
                    usage,
                    mapped_at_creation: false,
                })
            };
            Timestamps {
                set: device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("kiln profiler"),
                    ty: wgpu::QueryType::Timestamp,
                    count: MAX_PASSES * 2,
                }),
                resolve: buf("kiln timestamps", wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC),
                read: buf("kiln timestamps readback", wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
                period_ns: queue.get_timestamp_period() as f64,
            }
        });
        Profiler { enabled: false, timestamps, pending: Vec::new(), totals: BTreeMap::new() }
    }

    pub(crate) fn wall_clock(&self) -> bool {
        self.enabled && self.timestamps.is_none()
    }

    pub(crate) fn full(&self) -> bool {
        self.pending.len() as u32 >= MAX_PASSES
    }

    pub(crate) fn next_pass(&mut self, name: &'static str, work: Work) -> Option<wgpu::ComputePassTimestampWrites<'_>> {
        if !self.enabled || self.full() {
            return None;
        }
        let ts = self.timestamps.as_ref()?;
        let i = self.pending.len() as u32;
        self.pending.push((name, work));
        Some(wgpu::ComputePassTimestampWrites {
            query_set: &ts.set,
            beginning_of_pass_write_index: Some(2 * i),
            end_of_pass_write_index: Some(2 * i + 1),
        })
    }

    /// Record the copy of this command buffer's timestamps; returns the buffer to read after submission.
    pub(crate) fn resolve(&mut self, enc: &mut wgpu::CommandEncoder) -> Option<(wgpu::Buffer, u64)> {
        let ts = self.timestamps.as_ref()?;
        if self.pending.is_empty() {
            return None;
        }
        let n = self.pending.len() as u32 * 2;
        enc.resolve_query_set(&ts.set, 0..n, &ts.resolve, 0);
        enc.copy_buffer_to_buffer(&ts.resolve, 0, &ts.read, 0, n as u64 * 8);
        Some((ts.read.clone(), n as u64 * 8))
    }

    pub(crate) fn accumulate(&mut self, bytes: &[u8]) {
        let period = self.timestamps.as_ref().map_or(1.0, |t| t.period_ns);
        let stamps: &[u64] = bytemuck::cast_slice(bytes);
        for (i, (name, work)) in self.pending.drain(..).enumerate() {
            let ns = stamps[2 * i + 1].saturating_sub(stamps[2 * i]) as f64 * period;
            self.totals.entry(name).or_default().add(ns / 1e6, work);
        }
    }

    pub(crate) fn add_wall(&mut self, name: &'static str, d: Duration, work: Work) {
        self.totals.entry(name).or_default().add(d.as_secs_f64() * 1e3, work);
    }
}

impl Gpu {
    /// Start timing every kernel (clears earlier totals).
    pub fn profile_start(&self) -> crate::Result<()> {
        self.flush()?;
        let mut rec = self.recorder.lock().unwrap();
        rec.profiler.enabled = true;
        rec.profiler.totals.clear();
        Ok(())
    }

    /// Stop timing and return the totals per kernel, slowest first.
    pub fn profile_stop(&self) -> crate::Result<Vec<KernelTime>> {
        self.sync()?;
        let mut rec = self.recorder.lock().unwrap();
        rec.profiler.enabled = false;
        let mut out: Vec<KernelTime> = rec
            .profiler
            .totals
            .iter()
            .map(|(name, t)| KernelTime { name, calls: t.calls, total_ms: t.ms, flops: t.flops, bytes: t.bytes })
            .collect();
        out.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
        Ok(out)
    }

    /// Whether kernel times come from GPU timestamps (else wall clock around synchronous launches).
    pub fn profiler_uses_timestamps(&self) -> bool {
        self.recorder.lock().unwrap().profiler.timestamps.is_some()
    }
}
