//! Reading tensors back without stopping the recording thread: copies into a persistent host-readable buffer,
//! submitted with everything recorded before them, and waited for (by submission) on whichever thread wants the
//! data. Data-parallel training reads each bucket of finished gradients this way while the rest of the backward is
//! still being recorded and run, so the all-reduce of one bucket overlaps the computation of the next.

use std::sync::mpsc::{channel, Receiver};

use crate::tensor::DType;
use crate::{Error, Gpu, Result, Tensor};

/// A host-readable buffer made once (not per step) and reused for every read of the same bucket.
pub struct Readback {
    buffer: wgpu::Buffer,
    elems: usize,
}

/// A read in flight: `wait` blocks until its submission has run and returns the data.
pub struct PendingRead<'r> {
    readback: &'r Readback,
    elems: usize,
    index: Option<wgpu::SubmissionIndex>,
    mapped: Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
}

impl Gpu {
    /// A readback buffer of `elems` f32 values.
    pub fn readback_buffer(&self, elems: usize) -> Result<Readback> {
        let bytes = (elems.max(1) * 4) as u64;
        if bytes > self.limits().max_buffer_size {
            return Err(self.limit_error(
                "readback",
                "buffer",
                bytes,
                self.limits().max_buffer_size,
                "max_buffer_size",
            ));
        }
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln readback (persistent)"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Readback { buffer, elems })
    }

    /// Copy `tensors` end to end into `rb` after everything recorded so far, submit, and return the read in
    /// flight. The caller records on: later work goes into a new command buffer.
    pub fn start_read<'r>(&self, rb: &'r Readback, tensors: &[&Tensor]) -> Result<PendingRead<'r>> {
        let elems: usize = tensors.iter().map(|t| t.numel()).sum();
        if elems > rb.elems {
            return Err(Error::Invalid {
                op: "start_read",
                message: format!("{elems} values do not fit a readback buffer of {}", rb.elems),
            });
        }
        {
            let mut rec = self.recorder.lock().unwrap();
            let enc = rec.encoder(&self.device);
            let mut at = 0u64;
            for t in tensors {
                crate::gpu::expect_dtype("start_read", "tensor", t, DType::F32)?;
                enc.copy_buffer_to_buffer(t.buffer(), t.byte_offset(), &rb.buffer, at, t.bytes());
                at += t.bytes();
            }
        }
        let index = self.submit()?;
        let (tx, mapped) = channel();
        rb.buffer.map_async(wgpu::MapMode::Read, 0..(elems.max(1) * 4) as u64, move |r| {
            let _ = tx.send(r);
        });
        Ok(PendingRead { readback: rb, elems, index, mapped })
    }
}

impl PendingRead<'_> {
    /// Block until the copies have run (only their submission, not later ones), then return the values.
    pub fn wait(self, gpu: &Gpu) -> Result<Vec<f32>> {
        let poll = wgpu::PollType::Wait { submission_index: self.index, timeout: None };
        gpu.device.poll(poll).map_err(|e| Error::Gpu { context: "readback", message: e.to_string() })?;
        match self.mapped.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Gpu { context: "readback", message: e.to_string() }),
            Err(_) => return Err(Error::Gpu { context: "readback", message: "map callback never ran".into() }),
        }
        let bytes = (self.elems * 4) as u64;
        let data = {
            let view = self
                .readback
                .buffer
                .get_mapped_range(0..bytes.max(4))
                .map_err(|e| Error::Gpu { context: "readback", message: e.to_string() })?;
            bytemuck::cast_slice::<u8, f32>(&view[..bytes as usize]).to_vec()
        };
        self.readback.buffer.unmap();
        Ok(data)
    }
}
