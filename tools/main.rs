//! The `kiln` command line. Today: `devices` (what GPUs wgpu sees) and `quickstart` (device report plus a
//! self-check of every kernel against its CPU reference). Training commands arrive with the model issues.
//!
//! Run: `cargo run --release -- quickstart`, `cargo run --release -- devices`.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln_engine::{list_adapters, selfcheck, Gpu};

#[derive(Parser)]
#[command(name = "kiln", version, about = "Train language models on any GPU with hand-written WGSL kernels")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every GPU adapter wgpu can see, with backend, type, driver, key limits and features.
    Devices,
    /// Report the chosen device and check every kernel against its CPU f64 reference (max error, speed).
    Quickstart,
}

fn main() -> Result<()> {
    // Mesa warns when XDG_RUNTIME_DIR is unset; the warning is harmless but alarming, so give it a private dir.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join(format!("kiln-xdg-{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_ok() {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
            }
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
    match Cli::parse().command {
        Command::Devices => devices(),
        Command::Quickstart => quickstart(),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn devices() -> Result<()> {
    let all = list_adapters();
    if all.is_empty() {
        // Same advice as the engine's NoAdapter error.
        anyhow::bail!(kiln_engine::Error::NoAdapter { detail: "wgpu enumerated none".into() });
    }
    for (i, a) in all.iter().enumerate() {
        println!("[{i}] {} — {} {}, driver: {} {}", a.name, a.backend, a.device_type, a.driver, a.driver_info);
        println!(
            "    storage binding {}, buffer {}, workgroup memory {} KiB, {} invocations/workgroup, {} workgroups/dim, \
             immediates {} B, subgroup size {}..{}",
            mib(a.max_storage_binding),
            mib(a.max_buffer),
            a.max_workgroup_memory / 1024,
            a.max_invocations,
            a.max_workgroups_per_dim,
            a.max_immediates,
            a.subgroup_sizes.0,
            a.subgroup_sizes.1
        );
        println!("    features: {}", a.features.join(", "));
    }
    println!("Pick one with KILN_ADAPTER=<part of its name>; force a backend with WGPU_BACKEND=vulkan|metal|dx12.");
    Ok(())
}

fn quickstart() -> Result<()> {
    let gpu = Gpu::new().context("opening the GPU")?;
    println!("Kiln quickstart on {}", gpu.report());
    let lim = gpu.limits();
    println!(
        "limits: storage binding {}, buffer {}, workgroup memory {} KiB; timestamps: {}; subgroups: {}",
        mib(lim.max_storage_buffer_binding_size),
        mib(lim.max_buffer_size),
        lim.max_compute_workgroup_storage_size / 1024,
        gpu.has_timestamps(),
        gpu.has_subgroups()
    );
    println!("Self-check: every kernel against its CPU f64 reference (the model and trainers come next).\n");
    let rows = selfcheck::run(&gpu).context("running the kernel self-check")?;
    println!("{:<16} {:<36} {:>12} {:>10} {:>12}  result", "kernel", "shape", "max |err|", "tolerance", "speed");
    let mut failed = 0;
    for r in &rows {
        let ok = r.passed();
        failed += usize::from(!ok);
        println!(
            "{:<16} {:<36} {:>12.2e} {:>10.0e} {:>7.1} {:<7} {}",
            r.kernel,
            r.shape,
            r.max_abs_err,
            r.tolerance,
            r.rate,
            r.unit,
            if ok { "ok" } else { "FAIL" }
        );
    }
    if failed > 0 {
        anyhow::bail!("{failed} kernel(s) disagree with their CPU reference on {}", gpu.adapter_name());
    }
    println!("\nAll {} kernels agree with their references.", rows.len());
    Ok(())
}
