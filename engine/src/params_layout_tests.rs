//! Every launcher's Rust `Params` (sent as immediates, byte for byte) against the `struct Params` its WGSL module
//! declares, read by naga: the same field names in the same order at the same offsets with the same sizes, and
//! the same total size. A field added on one side only fails here instead of shifting every later field of a
//! launch.

use crate::ops::Field;
use crate::ops::{
    adamw, attention, classifier, elementwise, embedding, kv_cache, loss, matmul, norm, policy, reduce, rope, sampling,
};
use crate::shaders::*;

/// (name, offset, size) of each member of the WGSL struct `Params`, and the struct's span.
fn wgsl_params(source: &ShaderSource) -> (Vec<(String, usize, usize)>, usize) {
    let module = naga::front::wgsl::parse_str(source.source)
        .unwrap_or_else(|e| panic!("{}: {}", source.name, e.emit_to_string(source.source)));
    let mut layouter = naga::proc::Layouter::default();
    layouter.update(module.to_ctx()).expect("layouts of a valid module");
    let (_, ty) = module
        .types
        .iter()
        .find(|(_, t)| t.name.as_deref() == Some("Params"))
        .unwrap_or_else(|| panic!("{} declares no struct Params", source.name));
    let naga::TypeInner::Struct { members, span } = &ty.inner else {
        panic!("{}: Params is not a struct", source.name)
    };
    let fields = members
        .iter()
        .map(|m| (m.name.clone().unwrap_or_default(), m.offset as usize, layouter[m.ty].size as usize))
        .collect();
    (fields, *span as usize)
}

#[test]
fn rust_params_match_the_wgsl_structs() {
    let cases: [(&ShaderSource, Vec<Field>, usize); 16] = [
        (&ELEMENTWISE, elementwise::params_layout(), elementwise::params_size()),
        (&MATMUL, matmul::params_layout(), matmul::params_size()),
        (&MATMUL_REGISTER, matmul::params_layout(), matmul::params_size()),
        (&MATMUL_BLOCKED, matmul::params_layout(), matmul::params_size()),
        (&ATTENTION, attention::params_layout(), attention::params_size()),
        (&ATTENTION_CACHED, kv_cache::params_layout(), kv_cache::params_size()),
        (&NORM, norm::params_layout(), norm::params_size()),
        (&LOSS, loss::params_layout(), loss::params_size()),
        (&POLICY, policy::params_layout(), policy::params_size()),
        (&EMBEDDING, embedding::params_layout(), embedding::params_size()),
        (&CLASSIFIER, classifier::params_layout(), classifier::params_size()),
        (&REDUCE, reduce::params_layout(), reduce::params_size()),
        (&OPTIMIZER, adamw::params_layout(), adamw::params_size()),
        (&SAMPLING, sampling::params_layout(), sampling::params_size()),
        (&ROPE, rope::params_layout(), rope::params_size()),
        (&PROBE, crate::ops::probe::params_layout(), crate::ops::probe::params_size()),
    ];
    for (source, rust, rust_size) in cases {
        let (wgsl, span) = wgsl_params(source);
        let rust: Vec<(String, usize, usize)> = rust.into_iter().map(|(n, o, s)| (n.to_string(), o, s)).collect();
        assert_eq!(rust, wgsl, "{}: Rust Params (left) and WGSL Params (right) differ", source.name);
        assert_eq!(rust_size, span, "{}: Rust Params is {rust_size} bytes, the WGSL struct {span}", source.name);
    }
}

#[test]
fn the_check_sees_a_field_added_on_one_side() {
    // The same reading of a shader whose struct gained a field the Rust side lacks.
    let source = ShaderSource {
        name: "edited.wgsl",
        source: "struct Params { n: u32, alpha: f32, inner: u32, extra: u32, }\nvar<immediate> p: Params;\n\
                 @compute @workgroup_size(1) fn main() { _ = p.n; }",
        trusted: false,
    };
    let (wgsl, span) = wgsl_params(&source);
    let rust: Vec<(String, usize, usize)> =
        elementwise::params_layout().into_iter().map(|(n, o, s)| (n.to_string(), o, s)).collect();
    assert_ne!(rust, wgsl);
    assert_eq!((wgsl.len(), span), (4, 16));
}
