//! A tensor is a shape, an element type and a pooled GPU buffer. Cloning shares the buffer (like a view).

use std::sync::Arc;

use crate::pool::Pool;

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
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.give_back(self.id, self.class_bytes, b);
        }
    }
}

/// A dense row-major tensor living on the GPU.
#[derive(Clone)]
pub struct Tensor {
    pub(crate) storage: Arc<Storage>,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?}, buffer #{})", self.shape, self.dtype, self.storage.id)
    }
}

impl Tensor {
    pub(crate) fn new(storage: Arc<Storage>, shape: Vec<usize>, dtype: DType) -> Tensor {
        Tensor { storage, shape, dtype }
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
        Ok(Tensor { storage: self.storage.clone(), shape: shape.to_vec(), dtype: self.dtype })
    }
}
