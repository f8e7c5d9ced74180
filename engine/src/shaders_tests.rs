//! Every shader module, entry point and override-constant set Kiln builds passes naga's validation and translates
//! with the SPIR-V (Vulkan), MSL (Metal) and HLSL (DX12) back ends — so a construct one back end rejects fails
//! here, not on a user's Mac or Windows machine. Where `spirv-val` is installed (`tools/setup.sh` installs it with
//! lavapipe) the SPIR-V is validated too.

use super::*;
use crate::ops::matmul::BlockedConfig;
use crate::ops::{attention, kv_cache, reduce};

type Overrides = Vec<(&'static str, f64)>;

/// Head-loop trip counts the attention launchers pass (`HS4`): every head size from 1 to the kernels' maximum.
fn hs4_values() -> Vec<f64> {
    let mut v: Vec<f64> = (1..=attention::MAX_HEAD_SIZE).map(|hs| hs.next_power_of_two().div_ceil(4) as f64).collect();
    v.dedup();
    v
}

/// The override sets each module is built with, from the same constants the launchers use.
fn override_sets(module: &str) -> Vec<Overrides> {
    match module {
        "attention.wgsl" => {
            let mut sets = Vec::new();
            for hs4 in hs4_values() {
                for segmented in [0.0, 1.0] {
                    sets.push(vec![
                        ("BR", attention::BR as f64),
                        ("BKV", attention::BKV as f64),
                        ("HS4", hs4),
                        ("SEGMENTED", segmented),
                    ]);
                }
            }
            sets
        }
        "attention_register.wgsl" => {
            // HS4 = HS / 4 exactly: head sizes that are multiples of 4.
            let mut sets = Vec::new();
            for hs4 in 1..=attention::MAX_HEAD_SIZE / 4 {
                for segmented in [0.0, 1.0] {
                    sets.push(vec![
                        ("BR", attention::BR as f64),
                        ("BKV", attention::BKV as f64),
                        ("HS4", hs4 as f64),
                        ("SEGMENTED", segmented),
                    ]);
                }
            }
            sets
        }
        // WG = the adapter's fixed subgroup size (`norm::RowReduction`).
        "norm_subgroup.wgsl" | "loss_subgroup.wgsl" | "policy_subgroup.wgsl" => {
            crate::ops::norm::SUBGROUP_WG.iter().map(|(_, set)| set.to_vec()).collect()
        }
        "attention_cached.wgsl" => {
            hs4_values().into_iter().map(|hs4| vec![("BR", kv_cache::BR as f64), ("HS4", hs4)]).collect()
        }
        "reduce.wgsl" => {
            // The first level may add 1, 2 or 4 elements per thread (`reduce_all`), later levels ITEMS.
            let mut items = vec![1.0, 2.0, 4.0, reduce::ITEMS as f64];
            items.dedup();
            items.into_iter().map(|i| vec![("ITEMS", i)]).collect()
        }
        "matmul_blocked.wgsl" | "matmul_blocked_sg.wgsl" => {
            let sg = module == "matmul_blocked_sg.wgsl";
            BlockedConfig::CANDIDATES.iter().filter(|c| c.shared_a == sg).map(|c| c.overrides().to_vec()).collect()
        }
        _ => vec![vec![]],
    }
}

fn validator() -> naga::valid::Validator {
    let mut v = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all());
    v.subgroup_stages(naga::valid::ShaderStages::COMPUTE);
    v.subgroup_operations(naga::valid::SubgroupOperationSet::all());
    v
}

/// Runs one back end, turning both its errors and its panics (naga has `unreachable!`s for constructs a target
/// lacks) into an `Err` that names it.
fn guarded<T, E: std::fmt::Display>(back_end: &str, f: impl FnOnce() -> Result<T, E>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{back_end}: {e}")),
        Err(panic) => {
            let msg =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(format!("{back_end}: panicked: {}", msg.unwrap_or_default()))
        }
    }
}

/// The translations of one entry point with one override set; `Err` names the back end that refused.
fn translate(module: &naga::Module, info: &naga::valid::ModuleInfo, entry: &str) -> Result<Vec<u32>, String> {
    let stage = naga::ShaderStage::Compute;
    let spv_opts = naga::back::spv::Options { lang_version: (1, 3), ..Default::default() };
    let spv_pipe = naga::back::spv::PipelineOptions { shader_stage: stage, entry_point: entry.to_string() };
    let spv = guarded("SPIR-V", || naga::back::spv::write_vec(module, info, &spv_opts, Some(&spv_pipe)))?;

    // Metal 2.4: simdgroup functions (subgroups) need 2.1+, and wgpu asks for the newest the device has.
    let mut msl_opts = naga::back::msl::Options { lang_version: (2, 4), ..Default::default() };
    msl_opts.per_entry_point_map.insert(
        entry.to_string(),
        naga::back::msl::EntryPointResources {
            immediates_buffer: Some(30),
            sizes_buffer: Some(29),
            ..Default::default()
        },
    );
    let msl_pipe =
        naga::back::msl::PipelineOptions { entry_point: Some((stage, entry.to_string())), ..Default::default() };
    guarded("MSL", || naga::back::msl::write_string(module, info, &msl_opts, &msl_pipe))?;

    // Shader model 6.2: wave intrinsics (6.0) and 16-bit types (6.2), as wgpu's DX12 back end requests them.
    let hlsl_opts = naga::back::hlsl::Options {
        shader_model: naga::back::hlsl::ShaderModel::V6_2,
        immediates_target: Some(naga::back::hlsl::BindTarget { space: 0, register: 0, ..Default::default() }),
        ..Default::default()
    };
    let hlsl_pipe = naga::back::hlsl::PipelineOptions { entry_point: Some((stage, entry.to_string())) };
    guarded("HLSL", || {
        let mut out = String::new();
        naga::back::hlsl::Writer::new(&mut out, &hlsl_opts, &hlsl_pipe).write(module, info, None).map(|_| out)
    })?;
    Ok(spv)
}

/// Runs `spirv-val` on one module's words when the tool is installed; `None` when it is not.
fn spirv_val(words: &[u32], name: &str) -> Option<Result<(), String>> {
    let dir = std::env::temp_dir().join(format!("kiln-spv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("{name}.spv"));
    std::fs::write(&path, bytemuck::cast_slice::<u32, u8>(words)).ok()?;
    let out = std::process::Command::new("spirv-val").arg("--target-env").arg("vulkan1.1").arg(&path).output();
    let _ = std::fs::remove_file(&path);
    let out = out.ok()?;
    Some(if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) })
}

#[test]
fn every_shader_translates_for_vulkan_metal_and_dx12() {
    let mut failures = Vec::new();
    let (mut pipelines, mut validated) = (0, 0);
    for source in ALL {
        let module = naga::front::wgsl::parse_str(source.source)
            .unwrap_or_else(|e| panic!("{}: {}", source.name, e.emit_to_string(source.source)));
        let info = validator().validate(&module).unwrap_or_else(|e| panic!("{}: {e:?}", source.name));
        let declared: Vec<String> = module.overrides.iter().filter_map(|(_, o)| o.name.clone()).collect();
        let sets = override_sets(source.name);
        // Every override the module declares is set by the catalogue (else its default would be all we test).
        for name in &declared {
            assert!(
                sets.iter().all(|s| s.iter().any(|(n, _)| n == name)),
                "{}: override {name} not covered",
                source.name
            );
        }
        for entry in module.entry_points.iter().map(|e| e.name.clone()) {
            for set in &sets {
                let mut constants = naga::back::PipelineConstants::default();
                for (name, value) in set {
                    constants.insert(name.to_string(), *value);
                }
                let what = format!("{}::{entry} {set:?}", source.name);
                let (m, i) = match naga::back::pipeline_constants::process_overrides(
                    &module,
                    &info,
                    Some((naga::ShaderStage::Compute, &entry)),
                    &constants,
                ) {
                    Ok(r) => r,
                    Err(e) => {
                        failures.push(format!("{what}: overrides: {e}"));
                        continue;
                    }
                };
                pipelines += 1;
                match translate(&m, &i, &entry) {
                    Err(e) => failures.push(format!("{what}: {e}")),
                    Ok(words) => match spirv_val(&words, &format!("{}-{entry}-{pipelines}", source.name)) {
                        Some(Err(e)) => failures.push(format!("{what}: spirv-val: {e}")),
                        Some(Ok(())) => validated += 1,
                        None => {}
                    },
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {pipelines} pipelines failed:\n{}", failures.len(), failures.join("\n"));
    assert!(pipelines > 100, "only {pipelines} pipelines: is the catalogue empty?");
    eprintln!("{pipelines} pipelines translated to SPIR-V, MSL and HLSL; {validated} validated by spirv-val");
    if validated == 0 {
        eprintln!("spirv-val not installed: SPIR-V translated but not validated (apt-get install spirv-tools)");
    }
}

#[test]
fn a_construct_one_back_end_lacks_fails_the_translation() {
    // f64 is valid WGSL with the SHADER_F64 capability and fine in SPIR-V, but Metal has no double type.
    let src = "@group(0) @binding(0) var<storage, read_write> out: array<f32>;
        @compute @workgroup_size(1) fn main() { let x: f64 = f64(out[0]); out[0] = f32(x * 2.0lf); }";
    let module = naga::front::wgsl::parse_str(src).unwrap();
    let info = validator().validate(&module).unwrap();
    let err = translate(&module, &info, "main").unwrap_err();
    assert!(err.starts_with("MSL"), "{err}");
}
