//! Which matmul design runs, per adapter and shape class: the first product of a class times every candidate the
//! adapter can run on a representative problem and keeps the fastest, in memory and in a small file under the
//! user's cache directory (keyed by adapter, backend and driver), so later runs start tuned — as llama.cpp's
//! WebGPU backend tunes its tiles per GPU. `KILN_MATMUL=<variant>` forces one design; `KILN_AUTOTUNE=off` takes
//! a fixed default without timing anything.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::ops::matmul::{matmul_with, BlockedConfig, MatmulShape, MatmulSpec, MatmulVariant};
use crate::{DType, Error, Gpu, Result};

/// Problems are tuned by output size and by whether their rows are whole vec4s (which entry point runs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShapeClass {
    pub size: SizeClass,
    pub vec4: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeClass {
    /// M·N ≤ 256²: few workgroups, small tiles keep the GPU busy.
    Small,
    /// M·N ≤ 1024².
    Medium,
    Large,
}

impl ShapeClass {
    pub const ALL: [ShapeClass; 6] = [
        ShapeClass { size: SizeClass::Small, vec4: true },
        ShapeClass { size: SizeClass::Medium, vec4: true },
        ShapeClass { size: SizeClass::Large, vec4: true },
        ShapeClass { size: SizeClass::Small, vec4: false },
        ShapeClass { size: SizeClass::Medium, vec4: false },
        ShapeClass { size: SizeClass::Large, vec4: false },
    ];

    pub fn of(s: &MatmulShape, spec: MatmulSpec) -> ShapeClass {
        let outputs = s.m * s.n;
        let size = if outputs <= 256 * 256 {
            SizeClass::Small
        } else if outputs <= 1024 * 1024 {
            SizeClass::Medium
        } else {
            SizeClass::Large
        };
        let a_row = if spec.trans_a { s.m } else { s.k };
        let b_row = if spec.trans_b { s.k } else { s.n };
        ShapeClass { size, vec4: a_row.is_multiple_of(4) && b_row.is_multiple_of(4) }
    }

    /// The name used in the cache file and in reports.
    pub fn key(self) -> &'static str {
        match (self.size, self.vec4) {
            (SizeClass::Small, true) => "small",
            (SizeClass::Medium, true) => "medium",
            (SizeClass::Large, true) => "large",
            (SizeClass::Small, false) => "small-unaligned",
            (SizeClass::Medium, false) => "medium-unaligned",
            (SizeClass::Large, false) => "large-unaligned",
        }
    }

    /// The (m, n, k) the candidates race on. Software adapters run every class at 256³ (their speed hardly
    /// depends on the size and the race must stay short); unaligned classes take one less in every dimension.
    fn problem(self, software: bool) -> (usize, usize, usize) {
        let (m, n, k) = match (software, self.size) {
            (true, _) => (256, 256, 256),
            (false, SizeClass::Small) => (128, 128, 1024),
            (false, SizeClass::Medium) => (512, 512, 512),
            (false, SizeClass::Large) => (2048, 2048, 512),
        };
        if self.vec4 {
            (m, n, k)
        } else {
            (m - 1, n - 1, k - 1)
        }
    }
}

/// One tuning decision: the variant and, when it was timed here or read from the cache, its speed.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub variant: MatmulVariant,
    pub gflops: Option<f64>,
    pub source: &'static str,
}

/// The variant for a product of this shape on this adapter.
pub fn variant_for(gpu: &Gpu, shape: &MatmulShape, spec: MatmulSpec) -> Result<MatmulVariant> {
    Ok(choose(gpu, ShapeClass::of(shape, spec))?.variant)
}

/// The decision for one class: forced, remembered, read from the cache file, or raced now.
pub fn choose(gpu: &Gpu, class: ShapeClass) -> Result<Choice> {
    if let Some(c) = gpu.matmul_choices.lock().unwrap().get(class.key()) {
        return Ok(c.clone());
    }
    let choice = decide(gpu, class)?;
    gpu.matmul_choices.lock().unwrap().insert(class.key(), choice.clone());
    Ok(choice)
}

/// Every class decided so far in this process, for `kiln selfcheck` and step reports.
pub fn decided(gpu: &Gpu) -> Vec<(&'static str, Choice)> {
    let map = gpu.matmul_choices.lock().unwrap();
    ShapeClass::ALL.iter().filter_map(|c| map.get(c.key()).map(|ch| (c.key(), ch.clone()))).collect()
}

fn decide(gpu: &Gpu, class: ShapeClass) -> Result<Choice> {
    if let Ok(name) = std::env::var("KILN_MATMUL") {
        let variant: MatmulVariant = name.parse().map_err(|message| Error::Invalid { op: "matmul", message })?;
        if !variant.available(gpu) {
            return Err(Error::Invalid {
                op: "matmul",
                message: format!("KILN_MATMUL={name}: {} cannot run it", gpu.adapter_name()),
            });
        }
        return Ok(Choice { variant, gflops: None, source: "KILN_MATMUL" });
    }
    let candidates = candidates(gpu);
    if tuning_off() || candidates.len() == 1 {
        return Ok(Choice { variant: default_variant(gpu), gflops: None, source: "default" });
    }
    let key = adapter_key(gpu.info());
    let file = cache_file();
    let cached = file.as_deref().and_then(|f| read_cache(f, &key, class));
    if let Some((variant, gflops)) = cached.filter(|(v, _)| candidates.contains(v)) {
        return Ok(Choice { variant, gflops, source: "cache" });
    }
    let (variant, gflops) = race(gpu, class, &candidates)?;
    if let Some(f) = file {
        // A cache that cannot be written costs only a retune next run.
        let _ = write_cache(&f, &key, class, variant, gflops);
    }
    Ok(Choice { variant, gflops: Some(gflops), source: "tuned" })
}

fn tuning_off() -> bool {
    std::env::var("KILN_AUTOTUNE").is_ok_and(|v| matches!(v.as_str(), "off" | "0" | "false"))
}

/// What the autotuner races: the register design where the adapter has it, and every blocked configuration
/// that fits. The plain tiled kernel is never faster than the blocked ones and stays out.
pub fn candidates(gpu: &Gpu) -> Vec<MatmulVariant> {
    MatmulVariant::all_available(gpu).into_iter().filter(|v| *v != MatmulVariant::Tiled).collect()
}

/// Without tuning: software adapters with 8-lane subgroups take the register design (measured fastest there),
/// everything else Boehm's 128×128 blocked kernel, or the plain tiled one on an adapter too small for any.
pub fn default_variant(gpu: &Gpu) -> MatmulVariant {
    let c = candidates(gpu);
    if gpu.is_software() && c.contains(&MatmulVariant::Register) {
        return MatmulVariant::Register;
    }
    let default = MatmulVariant::Blocked(BlockedConfig::DEFAULT);
    if c.contains(&default) {
        return default;
    }
    c.into_iter().find(|v| *v != MatmulVariant::Register).unwrap_or(MatmulVariant::Tiled)
}

/// Times each candidate on the class's problem (after one call that compiles it) and returns the fastest with
/// its GFLOP/s. Runs outside any step: it submits and waits.
fn race(gpu: &Gpu, class: ShapeClass, candidates: &[MatmulVariant]) -> Result<(MatmulVariant, f64)> {
    let (m, n, k) = class.problem(gpu.is_software());
    let a = crate::ops::elementwise::zeros(gpu, &[m, k])?;
    let b = crate::ops::elementwise::zeros(gpu, &[k, n])?;
    let c = gpu.alloc(&[m, n], DType::F32)?;
    let flops = 2.0 * (m * n * k) as f64;
    let mut best = (MatmulVariant::Tiled, 0.0);
    for &v in candidates {
        let run = |reps: usize| -> Result<f64> {
            let t = Instant::now();
            for _ in 0..reps {
                matmul_with(gpu, v, &a, &b, None, &c, MatmulSpec::nn())?;
            }
            gpu.sync()?;
            Ok(t.elapsed().as_secs_f64() / reps as f64)
        };
        gpu.sync()?;
        let first = run(1)?; // includes the pipeline build
                             // About 20 ms of work per trial, at least one call; the best of two trials.
        let reps = (0.02 / run(1)?.min(first)).clamp(1.0, 50.0) as usize;
        let secs = run(reps)?.min(run(reps)?);
        let gflops = flops / secs / 1e9;
        if gflops > best.1 {
            best = (v, gflops);
        }
    }
    Ok(best)
}

/// Identifies an adapter and driver in the cache: a new driver retunes.
pub fn adapter_key(info: &wgpu::AdapterInfo) -> String {
    format!("{} | {:?} | {} {}", info.name, info.backend, info.driver, info.driver_info).replace(['\t', '\n'], " ")
}

/// `KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn cache_file() -> Option<PathBuf> {
    let dir = if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("kiln")
    } else {
        PathBuf::from(std::env::var_os("HOME")?).join(".cache").join("kiln")
    };
    Some(dir.join("matmul-autotune.tsv"))
}

/// The cache's lines: adapter key, class, variant, GFLOP/s, tab-separated. Unreadable lines are ignored (a
/// newer Kiln's variant name, a hand edit): the class is simply tuned again.
fn cache_lines(file: &Path) -> Vec<(String, String, MatmulVariant, Option<f64>)> {
    let Ok(text) = std::fs::read_to_string(file) else { return Vec::new() };
    text.lines()
        .filter_map(|line| {
            let mut f = line.split('\t');
            let (key, class, variant) = (f.next()?, f.next()?, f.next()?.parse().ok()?);
            Some((key.to_string(), class.to_string(), variant, f.next().and_then(|g| g.parse().ok())))
        })
        .collect()
}

fn read_cache(file: &Path, key: &str, class: ShapeClass) -> Option<(MatmulVariant, Option<f64>)> {
    cache_lines(file).into_iter().rev().find(|(k, c, ..)| k == key && c == class.key()).map(|(_, _, v, g)| (v, g))
}

/// The cached choices for one adapter (what `kiln devices` shows), by class name.
pub fn cached_for(file: &Path, key: &str) -> Vec<(String, MatmulVariant, Option<f64>)> {
    let mut out: Vec<(String, MatmulVariant, Option<f64>)> = Vec::new();
    for (k, class, v, g) in cache_lines(file) {
        if k == key {
            out.retain(|(c, ..)| *c != class);
            out.push((class, v, g));
        }
    }
    out
}

/// Adds (or replaces) one line, written to a temporary file and renamed over the cache so a reader never sees
/// half a file.
fn write_cache(path: &Path, key: &str, class: ShapeClass, variant: MatmulVariant, gflops: f64) -> std::io::Result<()> {
    let mut lines: Vec<String> = cache_lines(path)
        .into_iter()
        .filter(|(k, c, ..)| !(k == key && c == class.key()))
        .map(|(k, c, v, g)| format!("{k}\t{c}\t{v}\t{}", g.map_or(String::new(), |g| format!("{g:.2}"))))
        .collect();
    lines.push(format!("{key}\t{}\t{variant}\t{gflops:.2}", class.key()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, lines.join("\n") + "\n")?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
#[path = "matmul_tune_tests.rs"]
mod tests;
