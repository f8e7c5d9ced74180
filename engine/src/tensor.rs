//! A tensor is a shape, an element type and a pooled GPU buffer. Cloning shares the buffer (like a view).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::pool::{MemoryKind, Pool};

/// Element types the kernels read: f32 for values, i32 for token ids and targets (-1 marks ignored positions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    I32,
}

impl DType {
    pub const fn size(self) -> usize {
        4
    }
}

pub(crate) struct Storage {
    pub(crate) buffer: Option<wgpu::Buffer>,
    pub(crate) id: u64,
    pub(crate) class_bytes: u64,
    pub(crate) pool: Arc<Pool>,
    /// A [`MemoryKind`] as u8: what the pool counts this buffer as.
    pub(crate) kind: AtomicU8,
}

impl Storage {
    pub(crate) fn kind(&self) -> MemoryKind {
        MemoryKind::from_u8(self.kind.load(Ordering::Relaxed))
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.give_back(self.id, self.class_bytes, self.kind(), b);
        }
    }
}

/// A dense row-major tensor living on the GPU: `shape` elements from element `offset` of its buffer (a view of
/// part of a larger tensor has offset > 0; kernels see it bound at that offset).
#[derive(Clone)]
pub struct Tensor {
    pub(crate) storage: Arc<Storage>,
    offset: usize,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?}, buffer #{}", self.shape, self.dtype, self.storage.id)?;
        if self.offset > 0 {
            write!(f, " from element {}", self.offset)?;
        }
        write!(f, ")")
    }
}

impl Tensor {
    pub(crate) fn new(storage: Arc<Storage>, shape: Vec<usize>, dtype: DType) -> Tensor {
        Tensor { storage, offset: 0, shape, dtype }
    }

    /// First element of this tensor in its buffer (0 unless it is a view).
    pub fn offset(&self) -> usize {
        self.offset
    }

    pub(crate) fn byte_offset(&self) -> u64 {
        (self.offset * self.dtype.size()) as u64
    }

    /// `shape` elements of this tensor starting at its element `at`, sharing its memory. Kernels bind a view at its
    /// byte offset, which must be a multiple of the adapter's `min_storage_buffer_offset_alignment` (checked at
    /// dispatch; [`crate::Gpu::split_rows`] picks aligned row ranges).
    pub fn view(&self, at: usize, shape: &[usize]) -> crate::Result<Tensor> {
        let n: usize = shape.iter().product();
        if n == 0 || at + n > self.numel() {
            return Err(crate::Error::Shape {
                op: "view",
                what: "range",
                expected: format!("a non-empty range within the {} elements of {:?}", self.numel(), self.shape),
                got: format!("{n} elements (shape {shape:?}) from element {at}"),
            });
        }
        Ok(Tensor { storage: self.storage.clone(), offset: self.offset + at, shape: shape.to_vec(), dtype: self.dtype })
    }

    /// Rows r0..r1 of the first dimension (a view).
    pub fn rows(&self, r0: usize, r1: usize) -> crate::Result<Tensor> {
        let row: usize = self.shape.iter().skip(1).product();
        let mut shape = self.shape.clone();
        if shape.is_empty() || r0 >= r1 || r1 > shape[0] {
            return Err(crate::Error::Shape {
                op: "rows",
                what: "row range",
                expected: format!("0 <= r0 < r1 <= {} (rows of {:?})", shape.first().unwrap_or(&0), self.shape),
                got: format!("{r0}..{r1}"),
            });
        }
        shape[0] = r1 - r0;
        self.view(r0 * row, &shape)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes the elements occupy (the buffer itself may be larger: pool size classes).
    pub fn bytes(&self) -> u64 {
        (self.numel() * self.dtype.size()) as u64
    }

    /// Identity of the underlying buffer: two tensors with the same id share memory.
    pub fn buffer_id(&self) -> u64 {
        self.storage.id
    }

    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        self.storage.buffer.as_ref().expect("storage holds its buffer until dropped")
    }

    /// The same memory seen with another shape of equal element count.
    pub fn reshape(&self, shape: &[usize]) -> crate::Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(crate::Error::Shape {
                op: "reshape",
                what: "element count",
                expected: format!("{} elements (shape {:?})", self.numel(), self.shape),
                got: format!("{n} elements (shape {shape:?})"),
            });
        }
        Ok(Tensor { storage: self.storage.clone(), offset: self.offset, shape: shape.to_vec(), dtype: self.dtype })
    }
}
