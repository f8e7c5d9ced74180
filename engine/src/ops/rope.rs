//! SHIM
use crate::{Gpu, Result, Tensor};
pub struct RopeTable {
    pub cos: Tensor,
}
impl RopeTable {
    pub fn new(_gpu: &Gpu, _hs: usize, _max: usize, _theta: f64) -> Result<RopeTable> {
        Err(crate::Error::Invalid { op: "rope", message: "not yet".into() })
    }
}
