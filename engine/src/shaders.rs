//! The only place that embeds WGSL. One file per kernel family under `shaders/`; pipelines are built lazily from
//! these and cached by (shader, entry point, override constants) in `launch.rs`.

/// A WGSL source embedded in the binary.
pub struct ShaderSource {
    pub name: &'static str,
    pub source: &'static str,
}

macro_rules! shader {
    ($ident:ident, $file:literal) => {
        pub static $ident: ShaderSource =
            ShaderSource { name: $file, source: include_str!(concat!("../../shaders/", $file)) };
    };
}

shader!(ELEMENTWISE, "elementwise.wgsl");
shader!(MATMUL, "matmul.wgsl");
shader!(ATTENTION, "attention.wgsl");
shader!(NORM, "norm.wgsl");
shader!(LOSS, "loss.wgsl");
shader!(EMBEDDING, "embedding.wgsl");
shader!(REDUCE, "reduce.wgsl");
shader!(OPTIMIZER, "optimizer.wgsl");
