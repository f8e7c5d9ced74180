//! The only place that embeds WGSL. One file per kernel family under `shaders/`; pipelines are built lazily from
//! these and cached by (shader, entry point, override constants) in `launch.rs`.

/// A WGSL source embedded in the binary.
pub struct ShaderSource {
    pub name: &'static str,
    pub source: &'static str,
    /// Built without naga's runtime bounds checks. Only for kernels whose every index is clamped or guarded in
    /// the WGSL itself and whose launcher validates shapes: the checks turn each load into a branch, which costs a
    /// software GPU a masked gather per load.
    pub trusted: bool,
}

macro_rules! shader {
    ($ident:ident, $file:literal) => {
        shader!($ident, $file, false);
    };
    ($ident:ident, $file:literal, $trusted:literal) => {
        pub static $ident: ShaderSource =
            ShaderSource { name: $file, source: include_str!(concat!("../../shaders/", $file)), trusted: $trusted };
    };
}

shader!(ELEMENTWISE, "elementwise.wgsl");
shader!(MATMUL, "matmul.wgsl", true);
/// The register-tiled matmul needs subgroups, so it is a module of its own: matmul.wgsl (Params, bindings, `store`)
/// followed by matmul_register.wgsl. Adapters without subgroups never build it.
pub static MATMUL_REGISTER: ShaderSource = ShaderSource {
    name: "matmul_register.wgsl",
    source: concat!(include_str!("../../shaders/matmul.wgsl"), include_str!("../../shaders/matmul_register.wgsl")),
    trusted: true,
};
/// The blocked (GPU) matmul: matmul.wgsl's Params, bindings and `store`, then matmul_blocked.wgsl, then how it
/// reads A's fragments: from workgroup memory (any adapter) or shared across the subgroup (the `-sg` candidates).
pub static MATMUL_BLOCKED: ShaderSource = ShaderSource {
    name: "matmul_blocked.wgsl",
    source: concat!(
        include_str!("../../shaders/matmul.wgsl"),
        include_str!("../../shaders/matmul_blocked.wgsl"),
        include_str!("../../shaders/matmul_blocked_a.wgsl")
    ),
    trusted: true,
};
pub static MATMUL_BLOCKED_SG: ShaderSource = ShaderSource {
    name: "matmul_blocked_sg.wgsl",
    source: concat!(
        include_str!("../../shaders/matmul.wgsl"),
        include_str!("../../shaders/matmul_blocked.wgsl"),
        include_str!("../../shaders/matmul_blocked_a_subgroup.wgsl")
    ),
    trusted: true,
};
shader!(ATTENTION, "attention.wgsl", true);
/// The register-tiled attention needs subgroups: attention.wgsl (Params, bindings, helpers, overrides) followed by
/// attention_register.wgsl. Adapters without subgroups never build it.
pub static ATTENTION_REGISTER: ShaderSource = ShaderSource {
    name: "attention_register.wgsl",
    source: concat!(
        include_str!("../../shaders/attention.wgsl"),
        include_str!("../../shaders/attention_register.wgsl")
    ),
    trusted: true,
};
/// The row kernels share rows.wgsl (WG, the reduction trees, row folding), prepended to each family's file: WGSL
/// has no includes, and one copy of the trees is one place to fix.
pub static NORM: ShaderSource = ShaderSource {
    name: "norm.wgsl",
    source: concat!(include_str!("../../shaders/rows.wgsl"), include_str!("../../shaders/norm.wgsl")),
    trusted: false,
};
pub static LOSS: ShaderSource = ShaderSource {
    name: "loss.wgsl",
    source: concat!(include_str!("../../shaders/rows.wgsl"), include_str!("../../shaders/loss.wgsl")),
    trusted: false,
};
/// The same two families with rows_subgroup.wgsl's reductions (one subgroup per row): adapters with fixed-size
/// subgroups.
pub static NORM_SUBGROUP: ShaderSource = ShaderSource {
    name: "norm_subgroup.wgsl",
    source: concat!(include_str!("../../shaders/rows_subgroup.wgsl"), include_str!("../../shaders/norm.wgsl")),
    trusted: false,
};
pub static LOSS_SUBGROUP: ShaderSource = ShaderSource {
    name: "loss_subgroup.wgsl",
    source: concat!(include_str!("../../shaders/rows_subgroup.wgsl"), include_str!("../../shaders/loss.wgsl")),
    trusted: false,
};
/// RL objectives (policy loss, entropy, KL): rows.wgsl prepended, as the other row kernels.
pub static POLICY: ShaderSource = ShaderSource {
    name: "policy.wgsl",
    source: concat!(include_str!("../../shaders/rows.wgsl"), include_str!("../../shaders/policy.wgsl")),
    trusted: false,
};
pub static POLICY_SUBGROUP: ShaderSource = ShaderSource {
    name: "policy_subgroup.wgsl",
    source: concat!(include_str!("../../shaders/rows_subgroup.wgsl"), include_str!("../../shaders/policy.wgsl")),
    trusted: false,
};
shader!(EMBEDDING, "embedding.wgsl");
shader!(CLASSIFIER, "classifier.wgsl");
shader!(REDUCE, "reduce.wgsl");
shader!(OPTIMIZER, "optimizer.wgsl");
shader!(SAMPLING, "sampling.wgsl");
shader!(ROPE, "rope.wgsl");
// Peak probes (FMA throughput, copy bandwidth) for the profiler.
shader!(PROBE, "probe.wgsl");
// Attention over a KV cache (generation): its own module, since it needs immediates attention.wgsl lacks.
shader!(ATTENTION_CACHED, "attention_cached.wgsl");

/// Every module Kiln builds (the translation test walks them all; a new module belongs here).
pub static ALL: [&ShaderSource; 21] = [
    &ELEMENTWISE,
    &MATMUL,
    &MATMUL_REGISTER,
    &MATMUL_BLOCKED,
    &MATMUL_BLOCKED_SG,
    &ATTENTION,
    &ATTENTION_REGISTER,
    &ATTENTION_CACHED,
    &NORM,
    &NORM_SUBGROUP,
    &LOSS,
    &LOSS_SUBGROUP,
    &POLICY,
    &POLICY_SUBGROUP,
    &EMBEDDING,
    &CLASSIFIER,
    &REDUCE,
    &OPTIMIZER,
    &SAMPLING,
    &ROPE,
    &PROBE,
];

#[cfg(test)]
#[path = "shaders_tests.rs"]
mod tests;
