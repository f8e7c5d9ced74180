//! Buffer pool: tensors borrow GPU buffers from size classes and give them back on drop, so a training step in
//! steady state creates no buffers. It also counts live and peak bytes, which later issues track per step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What a tensor's memory holds, so the pool can say where a step's peak went. Tensors start as activations;
/// the model and optimizer mark their persistent state, and the chunked classifier its scratch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Activations = 0,
    Parameters = 1,
    Gradients = 2,
    Optimizer = 3,
    Scratch = 4,
}

/// Bytes by [`MemoryKind`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemorySplit {
    pub parameters: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub scratch: u64,
}

impl MemorySplit {
    fn slot(&mut self, kind: MemoryKind) -> &mut u64 {
        match kind {
            MemoryKind::Activations => &mut self.activations,
            MemoryKind::Parameters => &mut self.parameters,
            MemoryKind::Gradients => &mut self.gradients,
            MemoryKind::Optimizer => &mut self.optimizer,
            MemoryKind::Scratch => &mut self.scratch,
        }
    }

    pub fn total(&self) -> u64 {
        self.parameters + self.gradients + self.optimizer + self.activations + self.scratch
    }
}

impl MemoryKind {
    pub(crate) fn from_u8(k: u8) -> MemoryKind {
        match k {
            1 => MemoryKind::Parameters,
            2 => MemoryKind::Gradients,
            3 => MemoryKind::Optimizer,
            4 => MemoryKind::Scratch,
            _ => MemoryKind::Activations,
        }
    }
}

/// Counters of the pool, in bytes of size-class capacity (what the GPU really holds for tensors).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes held by live tensors.
    pub live_bytes: u64,
    /// Highest `live_bytes` since the last `reset_peak`.
    pub peak_bytes: u64,
    /// Bytes of buffers the pool owns in all (live + free).
    pub reserved_bytes: u64,
    /// Buffers created on the device (a steady-state step adds none).
    pub buffers_created: u64,
    /// Allocations served from the free lists.
    pub reuses: u64,
    /// `live_bytes` by kind.
    pub live_split: MemorySplit,
    /// `live_split` at the moment `peak_bytes` was reached: where the peak went, measured, not estimated.
    pub peak_split: MemorySplit,
}

pub(crate) struct Pool {
    free: Mutex<HashMap<u64, Vec<(u64, wgpu::Buffer)>>>,
    stats: Mutex<PoolStats>,
    next_id: AtomicU64,
    /// Off: every allocation gets a fresh buffer and dropped ones are destroyed (for hunting reuse bugs).
    reuse: AtomicBool,
}

/// Round a byte size up to its class: 256-byte granules for small buffers, then eight classes per power of two, so
/// at most 12.5% is wasted and tensors of similar size share buffers across steps.
pub(crate) fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(4);
    if bytes <= 4096 {
        return bytes.div_ceil(256) * 256;
    }
    let top = 63 - bytes.leading_zeros() as u64; // 2^top <= bytes
    let step = 1u64 << (top - 3);
    bytes.div_ceil(step) * step
}

impl Pool {
    pub(crate) fn new() -> Arc<Pool> {
        Arc::new(Pool {
            free: Mutex::new(HashMap::new()),
            stats: Mutex::new(PoolStats::default()),
            next_id: AtomicU64::new(1),
            reuse: AtomicBool::new(true),
        })
    }

    /// Take a buffer of at least `bytes` bytes; `create` makes one when no free buffer of the class exists.
    pub(crate) fn take(
        &self,
        bytes: u64,
        kind: MemoryKind,
        create: impl FnOnce(u64) -> wgpu::Buffer,
    ) -> (u64, u64, wgpu::Buffer) {
        let class = size_class(bytes);
        let reused = if self.reuse.load(Ordering::Relaxed) {
            self.free.lock().unwrap().get_mut(&class).and_then(|v| v.pop())
        } else {
            None
        };
        let mut stats = self.stats.lock().unwrap();
        let (id, buffer) = match reused {
            Some(b) => {
                stats.reuses += 1;
                b
            }
            None => {
                stats.buffers_created += 1;
                stats.reserved_bytes += class;
                (self.next_id.fetch_add(1, Ordering::Relaxed), create(class))
            }
        };
        stats.live_bytes += class;
        *stats.live_split.slot(kind) += class;
        if stats.live_bytes > stats.peak_bytes {
            stats.peak_bytes = stats.live_bytes;
            stats.peak_split = stats.live_split;
        }
        (id, class, buffer)
    }

    /// Count a live buffer of `class` bytes as `to` instead of `from`.
    pub(crate) fn retag(&self, class: u64, from: MemoryKind, to: MemoryKind) {
        let mut stats = self.stats.lock().unwrap();
        *stats.live_split.slot(from) -= class;
        *stats.live_split.slot(to) += class;
    }

    pub(crate) fn give_back(&self, id: u64, class: u64, kind: MemoryKind, buffer: wgpu::Buffer) {
        let mut stats = self.stats.lock().unwrap();
        stats.live_bytes -= class;
        *stats.live_split.slot(kind) -= class;
        if self.reuse.load(Ordering::Relaxed) {
            self.free.lock().unwrap().entry(class).or_default().push((id, buffer));
        } else {
            // Dropped, not destroyed: a kernel recorded but not yet submitted may still use it, and wgpu keeps a
            // dropped buffer alive until such work completes.
            stats.reserved_bytes -= class;
            drop(buffer);
        }
    }

    pub(crate) fn stats(&self) -> PoolStats {
        *self.stats.lock().unwrap()
    }

    pub(crate) fn reset_peak(&self) {
        let mut s = self.stats.lock().unwrap();
        s.peak_bytes = s.live_bytes;
        s.peak_split = s.live_split;
    }

    pub(crate) fn set_reuse(&self, on: bool) {
        self.reuse.store(on, Ordering::Relaxed);
        if !on {
            self.trim();
        }
    }

    /// Destroy every free buffer. Returns the ids destroyed so cached bind groups naming them can be dropped.
    pub(crate) fn trim(&self) -> Vec<u64> {
        let mut free = self.free.lock().unwrap();
        let mut stats = self.stats.lock().unwrap();
        let mut ids = Vec::new();
        for (class, list) in free.drain() {
            for (id, buffer) in list {
                stats.reserved_bytes -= class;
                drop(buffer); // not `destroy`: recorded work may still reference it (see `give_back`)
                ids.push(id);
            }
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_and_waste_little() {
        for bytes in [1u64, 4, 255, 256, 257, 4096, 4097, 5000, 1 << 20, (1 << 20) + 1, 123_456_789] {
            let c = size_class(bytes);
            assert!(c >= bytes, "{bytes} -> {c}");
            assert!(c.is_multiple_of(4), "class must stay a multiple of 4 bytes: {c}");
            // 256-byte granule below 4 KiB, otherwise at most 1/8 extra.
            assert!(c - bytes < 256 || (c - bytes) * 8 <= bytes, "{bytes} -> {c} wastes too much");
        }
    }
}
