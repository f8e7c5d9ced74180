//! The `kiln` command line: `quickstart` (prepare the bundled corpus, pretrain a tiny GPT, sample from it),
//! `prepare`, `pretrain`, `eval`, `generate`, plus `devices` and `selfcheck` for the GPU itself.
//!
//! Run: `cargo run --release -- quickstart`, `cargo run --release -- --help`.

/// `println!` on rank 0 only: the other ranks of a data-parallel job would print the same lines again.
macro_rules! say {
    ($($arg:tt)*) => {
        if !$crate::dist::quiet() {
            println!($($arg)*);
        }
    };
}

mod commands;
mod dist;
mod gpu_bench;
mod plot;
mod posttrain;
mod profile;
mod progress;
mod study;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln_engine::{list_adapters, selfcheck, Gpu};
use kiln_model::train::pretrain::TrainConfig;
use kiln_model::train::rl::RlConfig;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Train language models on any GPU with hand-written WGSL kernels")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where post-training examples come from.
#[derive(clap::Args)]
struct ExampleArgs {
    /// Generated tasks (train split): addition[:digits], reverse[:words], count; repeatable.
    #[arg(long = "task")]
    tasks: Vec<String>,
    /// JSONL instead of tasks: {"prompt","response"} lines for sft, {"prompt","answer"} for rl.
    #[arg(long, conflicts_with = "tasks")]
    data: Option<PathBuf>,
    /// Examples generated per task.
    #[arg(long, default_value_t = 5000)]
    examples: usize,
}

/// How a training command runs data-parallel when started under `mpirun -np N` (built with `--features mpi`).
#[derive(clap::Args, Clone, Copy)]
struct DistArgs {
    /// ZeRO stage: 1 shards the AdamW moments over the ranks (optimizer memory falls with N), 0 keeps a full copy
    /// on every rank. Results are the same either way.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    zero: u8,
    /// MiB of gradients per all-reduce message; smaller buckets start sooner (more overlap), larger ones pay
    /// less per-message latency.
    #[arg(long, default_value_t = 4.0)]
    bucket_mib: f64,
}

impl ExampleArgs {
    fn source(&self, seed: u64) -> posttrain::ExampleSource<'_> {
        posttrain::ExampleSource { tasks: &self.tasks, data: self.data.as_deref(), per_task: self.examples, seed }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Prepare the bundled corpus, pretrain the `tiny` preset for a few minutes, compare its validation loss with
    /// the unigram baseline, and sample text from it.
    Quickstart {
        #[arg(long, default_value = "runs/quickstart")]
        out: PathBuf,
        #[arg(long, default_value_t = 300)]
        steps: u64,
    },
    /// Tokenize a corpus into train/val shards (training a byte-level BPE tokenizer unless one is given).
    Prepare {
        /// Text files (UTF-8); none = the bundled Shakespeare corpus.
        #[arg(long = "input")]
        inputs: Vec<PathBuf>,
        #[arg(long, default_value = "runs/data")]
        out: PathBuf,
        #[arg(long, default_value_t = 4096)]
        vocab: usize,
        /// Use this tokenizer.json (any, GPT-2's included) instead of training one.
        #[arg(long, conflicts_with = "gpt2_vocab")]
        tokenizer: Option<PathBuf>,
        /// GPT-2's vocab.json (encoder.json) — with --gpt2-merges — instead of training a tokenizer.
        #[arg(long, requires = "gpt2_merges")]
        gpt2_vocab: Option<PathBuf>,
        /// GPT-2's merges.txt (vocab.bpe).
        #[arg(long, requires = "gpt2_vocab")]
        gpt2_merges: Option<PathBuf>,
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
    },
    /// Pretrain a model (GPT-2 or Llama family) on prepared shards; metrics to OUT/metrics.jsonl, checkpoints to
    /// OUT/checkpoint.
    Pretrain {
        #[arg(long, default_value = "runs/data")]
        data: PathBuf,
        #[arg(long, default_value = "runs/pretrain")]
        out: PathBuf,
        /// GPT-2 family: tiny, small, gpt2 (124M); Llama family: llama-tiny, smollm2-135m (vocabulary from the data).
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// A TOML model config instead of a preset: family ("gpt2" or "llama"), vocab_size, n_ctx, n_layer, n_head,
        /// n_embd, and optionally n_kv_head, n_inner, rope_theta, norm_eps, tie_embeddings, qkv_bias.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Continue from OUT/checkpoint exactly where it stopped.
        #[arg(long)]
        resume: bool,
        #[arg(long, default_value_t = 100)]
        eval_every: u64,
        #[arg(long, default_value_t = 20)]
        eval_batches: usize,
        #[arg(long, default_value_t = 500)]
        ckpt_every: u64,
        #[command(flatten)]
        dist: DistArgs,
        #[command(flatten)]
        train: TrainConfig,
    },
    /// Supervised fine-tuning from a checkpoint on chat-formatted task examples (loss on responses only).
    Sft {
        /// The checkpoint to start from (e.g. runs/pretrain/checkpoint); its tokenizer must have the chat tokens.
        #[arg(long)]
        init: PathBuf,
        #[arg(long, default_value = "runs/sft")]
        out: PathBuf,
        #[command(flatten)]
        examples: ExampleArgs,
        /// Prepared pretraining data (`kiln prepare` output): val.bin gives the general loss, train.bin the mix.
        #[arg(long)]
        pretrain_data: Option<PathBuf>,
        /// Fraction of rows that are pretraining text instead of task examples (needs --pretrain-data).
        #[arg(long, default_value_t = 0.0)]
        mix_pretrain: f64,
        #[arg(long)]
        resume: bool,
        #[arg(long, default_value_t = 50)]
        eval_every: u64,
        /// Eval-split prompts per task for the greedy accuracy.
        #[arg(long, default_value_t = 100)]
        eval_examples: usize,
        #[arg(long, default_value_t = 200)]
        ckpt_every: u64,
        #[command(flatten)]
        dist: DistArgs,
        #[command(flatten)]
        train: TrainConfig,
    },
    /// Policy-gradient RL (GRPO or REINFORCE) from a checkpoint on tasks with exact-match rewards.
    Rl {
        #[arg(long)]
        init: PathBuf,
        /// Frozen reference of the KL penalty (default: --init).
        #[arg(long)]
        reference: Option<PathBuf>,
        #[arg(long, default_value = "runs/rl")]
        out: PathBuf,
        #[command(flatten)]
        examples: ExampleArgs,
        #[arg(long)]
        resume: bool,
        #[arg(long, default_value_t = 10)]
        eval_every: u64,
        #[arg(long, default_value_t = 100)]
        eval_examples: usize,
        #[arg(long, default_value_t = 50)]
        ckpt_every: u64,
        #[command(flatten)]
        dist: DistArgs,
        #[command(flatten)]
        rl: RlConfig,
    },
    /// What post-training buys and costs: SFT and RL sweeps, a branch point (SFT, RL, on-policy SFT), a transfer
    /// matrix, every checkpoint scored (chance-corrected accuracy, pass@k, entropy, bits/byte, KL(base ‖ π) in
    /// nats/token) with paired bootstrap intervals; writes OUT/study.md, OUT/study.json and figures. A killed study
    /// resumes at its first unfinished run.
    Study {
        #[arg(long, default_value = "runs/study")]
        out: PathBuf,
        /// Redraw DIR/study.md and the figures from DIR/study.json, without training.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["plan", "quick"])]
        report: Option<PathBuf>,
        /// A study plan (TOML) merged over the built-in one; `kiln study --print-plan` shows every field.
        #[arg(long)]
        plan: Option<PathBuf>,
        /// Print the plan that would run (TOML) and exit.
        #[arg(long)]
        print_plan: bool,
        /// Override one plan field: `--set sft.0.lr=[1e-4,3e-4]`, `--set eval.samples=64`, `--set branch.enabled=false`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// The built-in plan that finishes in a few minutes on a software GPU.
        #[arg(long)]
        quick: bool,
        /// The model family of a pretrained base: gpt2 (the `tiny` preset) or llama (`llama-tiny`).
        #[arg(long)]
        arch: Option<String>,
        /// Start from this checkpoint instead of pretraining a base.
        #[arg(long)]
        base: Option<PathBuf>,
        /// Seeds 1..=N (the plan's `seeds`).
        #[arg(long)]
        seeds: Option<u64>,
        /// Tasks to post-train on (the plan's `tasks`).
        #[arg(long = "task")]
        tasks: Vec<String>,
        /// Prepared data (`kiln prepare` output) instead of the bundled corpus prepared into OUT/data.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Shorthands for `--set`: pretraining steps, the steps of every SFT and RL run, prompts and samples.
        #[arg(long)]
        pretrain_steps: Option<u64>,
        #[arg(long)]
        sft_steps: Option<u64>,
        #[arg(long)]
        rl_steps: Option<u64>,
        #[arg(long)]
        eval_prompts: Option<usize>,
        #[arg(long)]
        samples: Option<usize>,
    },
    /// Mean per-token loss and perplexity of a checkpoint on a text file.
    Eval {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        text: PathBuf,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Window length (default: the model's context).
        #[arg(long)]
        seq_len: Option<usize>,
    },
    /// Sample text from a checkpoint (KV cache and sampling on the GPU; seeded).
    Generate {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, default_value = "\n")]
        prompt: String,
        #[arg(long, default_value_t = 200)]
        max_tokens: usize,
        #[arg(long, default_value_t = 0.8)]
        temperature: f32,
        /// 0 turns top-k off.
        #[arg(long, default_value_t = 40)]
        top_k: u32,
        /// 1.0 turns top-p off.
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        #[arg(long, default_value_t = 1)]
        samples: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write the logits, loss and every parameter's gradient for a token batch (JSON rows) to a safetensors file.
    Inspect {
        #[arg(long)]
        checkpoint: PathBuf,
        /// JSON array of equal-length rows of token ids; inputs row[..-1], targets row[1..].
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Draw the loss curves of a metrics.jsonl (training and validation loss against step) as a PNG.
    Plot {
        #[arg(long, default_value = "runs/pretrain/metrics.jsonl")]
        metrics: PathBuf,
        #[arg(long, default_value = "runs/pretrain/loss.png")]
        out: PathBuf,
    },
    /// List every GPU adapter wgpu can see, with backend, type, driver, key limits and features.
    Devices,
    /// Check every kernel against its CPU f64 reference on this device (max error, speed).
    Selfcheck,
    /// Where a training step's time goes: per-kernel calls, time, FLOPs, bytes, GFLOP/s, GB/s and % of this
    /// adapter's measured peak (FMA and copy probes), sorted by time. Synthetic tokens: kernels' time does not
    /// depend on the text.
    Profile {
        /// Profile this checkpoint's model instead of a freshly initialised preset.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Vocabulary size of the preset model.
        #[arg(long, default_value_t = 2048)]
        vocab: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        /// Steps timed (after one warm-up step).
        #[arg(long, default_value_t = 2)]
        steps: u64,
        /// Also write the table as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Kiln's half of tools/gpu-bench.sh: matmul, attention forward+backward and a training step timed on this
    /// adapter, written as JSON for benches/torch_bench.py to run the same work in PyTorch.
    GpuBench {
        /// Shapes a software GPU finishes in about a minute (default: the shapes real GPUs are measured at).
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "gpu-bench.json")]
        json: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    // Errors print as one chain of causes ("reading train.bin: runs/data/train.bin: No such file ..."), without the
    // backtrace anyhow would add when RUST_BACKTRACE is set: they are about the user's input, not our code.
    let world = match dist::World::init() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match run(&world) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // With several ranks this ends the whole job (naming this rank), so no other rank waits for it.
            world.abort(&format!("{e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(world: &dist::World) -> Result<()> {
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
    let command = Cli::parse().command;
    if !matches!(command, Command::Pretrain { .. } | Command::Sft { .. } | Command::Rl { .. }) {
        dist::alone(world, command.name())?;
    }
    match command {
        Command::Devices => devices(),
        Command::Selfcheck => selfcheck(),
        Command::GpuBench { quick, json } => gpu_bench::gpu_bench_cmd(&open_gpu()?, quick, &json),
        Command::Profile { checkpoint, preset, vocab, batch, seq_len, steps, json } => profile::profile_cmd(
            &open_gpu()?,
            &profile::ProfileOpts {
                checkpoint: checkpoint.as_deref(),
                preset: &preset,
                vocab,
                batch,
                seq_len,
                steps,
                json,
            },
        ),
        Command::Quickstart { out, steps } => commands::quickstart_cmd(&open_gpu()?, &out, steps),
        Command::Prepare { inputs, out, vocab, tokenizer, gpt2_vocab, gpt2_merges, val_fraction } => {
            let source = match (&tokenizer, &gpt2_vocab, &gpt2_merges) {
                (Some(p), _, _) => commands::TokenizerSource::Json(p),
                (None, Some(v), Some(m)) => commands::TokenizerSource::Gpt2 { vocab_json: v, merges: m },
                _ => commands::TokenizerSource::Train(vocab),
            };
            commands::prepare_cmd(&inputs, &out, source, val_fraction).map(|_| ())
        }
        Command::Pretrain {
            data,
            out,
            preset,
            config,
            resume,
            eval_every,
            eval_batches,
            ckpt_every,
            dist,
            train: cfg,
        } => {
            let model = match &config {
                Some(p) => commands::ModelChoice::Toml(p),
                None => commands::ModelChoice::Preset(&preset),
            };
            let opts = commands::PretrainOpts {
                data: &data,
                out: &out,
                model,
                resume,
                eval_every: eval_every.max(1),
                eval_batches,
                ckpt_every: ckpt_every.max(1),
                world: dist::Job::new(world, dist.zero, dist.bucket_mib)?,
            };
            commands::pretrain_cmd(&rank_gpu(world)?, &opts, cfg).map(|_| ())
        }
        Command::Sft {
            init,
            out,
            examples,
            pretrain_data,
            mix_pretrain,
            resume,
            eval_every,
            eval_examples,
            ckpt_every,
            dist,
            train: cfg,
        } => {
            let opts = posttrain::SftOpts {
                init: &init,
                out: &out,
                examples: examples.source(cfg.seed),
                pretrain_data: pretrain_data.as_deref(),
                mix: mix_pretrain,
                resume,
                eval_every: eval_every.max(1),
                eval_examples: eval_examples.max(1),
                ckpt_every: ckpt_every.max(1),
                world: dist::Job::new(world, dist.zero, dist.bucket_mib)?,
            };
            posttrain::sft_cmd(&rank_gpu(world)?, &opts, cfg)
        }
        Command::Rl {
            init,
            reference,
            out,
            examples,
            resume,
            eval_every,
            eval_examples,
            ckpt_every,
            dist,
            rl: cfg,
        } => {
            let opts = posttrain::RlOpts {
                init: &init,
                reference: reference.as_deref(),
                out: &out,
                examples: examples.source(cfg.seed),
                resume,
                eval_every: eval_every.max(1),
                eval_examples: eval_examples.max(1),
                ckpt_every: ckpt_every.max(1),
                world: dist::Job::new(world, dist.zero, dist.bucket_mib)?,
            };
            posttrain::rl_cmd(&rank_gpu(world)?, &opts, cfg)
        }
        Command::Study {
            out,
            report,
            plan,
            print_plan,
            mut sets,
            quick,
            arch,
            base,
            seeds,
            tasks,
            data,
            pretrain_steps,
            sft_steps,
            rl_steps,
            eval_prompts,
            samples,
        } => {
            if let Some(dir) = report {
                return study::report_cmd(&dir);
            }
            let text =
                plan.as_ref().map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())));
            let text = text.transpose()?;
            let name = plan.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            // Shorthands first, so an explicit --set of the same field wins.
            let mut pre: Vec<String> = Vec::new();
            let quote = |s: &str| format!("{s:?}");
            pre.extend(arch.map(|a| format!("arch={}", quote(&a))));
            pre.extend(base.map(|b| format!("base={}", quote(&b.display().to_string()))));
            pre.extend(seeds.map(|n| format!("seeds={n}")));
            if !tasks.is_empty() {
                let list: Vec<String> = tasks.iter().map(|t| quote(t)).collect();
                pre.push(format!("tasks=[{}]", list.join(",")));
            }
            pre.extend(pretrain_steps.map(|n| format!("pretrain.steps={n}")));
            pre.extend(eval_prompts.map(|n| format!("eval.prompts={n}")));
            pre.extend(samples.map(|n| format!("eval.samples={n}")));
            let loaded = study::plan::Plan::load(quick, text.as_deref().map(|t| (name.as_str(), t)), &pre)?;
            // Step shorthands reach every run of the plan as it stands.
            for i in 0..loaded.sft.len() {
                pre.extend(sft_steps.map(|n| format!("sft.{i}.steps={n}")));
            }
            for i in 0..loaded.rl.len() {
                pre.extend(rl_steps.map(|n| format!("rl.{i}.steps={n}")));
            }
            if let Some(n) = sft_steps {
                pre.push(format!("branch.at={}", (n / 2).max(1)));
                pre.push(format!("branch.sft_steps={n}"));
            }
            pre.extend(rl_steps.map(|n| format!("branch.rl_steps={n}")));
            pre.append(&mut sets);
            let plan = study::plan::Plan::load(quick, text.as_deref().map(|t| (name.as_str(), t)), &pre)?;
            if print_plan {
                print!("{}", plan.to_toml()?);
                return Ok(());
            }
            study::study_cmd(&open_gpu()?, &study::StudyOpts { out, plan, data })
        }
        Command::Plot { metrics, out } => plot::plot_cmd(&metrics, &out),
        Command::Inspect { checkpoint, tokens, out } => commands::inspect_cmd(&open_gpu()?, &checkpoint, &tokens, &out),
        Command::Eval { checkpoint, text, batch, seq_len } => {
            commands::eval_cmd(&open_gpu()?, &checkpoint, &text, batch.max(1), seq_len)
        }
        Command::Generate { checkpoint, prompt, max_tokens, temperature, top_k, top_p, samples, seed } => {
            let prompt = prompt.replace("\\n", "\n");
            let sampling = kiln_engine::ops::sampling::SamplingParams { temperature, top_k, top_p };
            let cfg = kiln_model::eval::generate::GenerateConfig {
                max_new_tokens: max_tokens,
                sampling,
                seed,
                stop_token: None,
                vocab_limit: None, // generate_cmd sets the checkpoint tokenizer's
            };
            commands::generate_cmd(&open_gpu()?, &checkpoint, &prompt, samples, cfg)
        }
    }
}

fn open_gpu() -> Result<Gpu> {
    Gpu::new().context("opening the GPU")
}

/// The GPU of this rank: `KILN_ADAPTER`, or the machine's best adapters round-robin by local rank.
fn rank_gpu(world: &dist::World) -> Result<Gpu> {
    if world.size == 1 {
        return open_gpu();
    }
    let gpu = Gpu::for_local_rank(world.local_rank)
        .with_context(|| format!("opening the GPU of rank {} (local rank {})", world.rank, world.local_rank))?;
    // One write of the whole line: eprintln! may split it into several writes, and mpirun forwards every rank's
    // stderr into one stream, where pieces of two ranks' lines can interleave.
    let line = format!("rank {} of {} (pid {}): {}\n", world.rank, world.size, std::process::id(), gpu.adapter_name());
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    Ok(gpu)
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Quickstart { .. } => "quickstart",
            Command::Prepare { .. } => "prepare",
            Command::Pretrain { .. } => "pretrain",
            Command::Sft { .. } => "sft",
            Command::Rl { .. } => "rl",
            Command::Study { .. } => "study",
            Command::Eval { .. } => "eval",
            Command::Generate { .. } => "generate",
            Command::Inspect { .. } => "inspect",
            Command::Plot { .. } => "plot",
            Command::Devices => "devices",
            Command::Profile { .. } => "profile",
            Command::GpuBench { .. } => "gpu-bench",
            Command::Selfcheck => "selfcheck",
        }
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
        let tuned = kiln_engine::ops::matmul_tune::cache_file()
            .map(|f| kiln_engine::ops::matmul_tune::cached_for(&f, &a.tuning_key))
            .unwrap_or_default();
        if tuned.is_empty() {
            println!("    matmul: not tuned yet (the first products of each size class time the candidates)");
        } else {
            let list: Vec<String> = tuned
                .iter()
                .map(|(class, v, g)| {
                    format!("{class} {v}{}", g.map_or(String::new(), |g| format!(" ({g:.1} GFLOP/s)")))
                })
                .collect();
            println!("    matmul tuned: {}", list.join(", "));
        }
    }
    println!("Pick one with KILN_ADAPTER=<part of its name>; force a backend with WGPU_BACKEND=vulkan|metal|dx12.");
    Ok(())
}

/// Which matmul design each size class runs and why (KILN_MATMUL, default, cache, or timed in this run).
fn print_matmul_choices(gpu: &kiln_engine::Gpu) {
    use kiln_engine::ops::matmul_tune;
    for (class, c) in matmul_tune::decided(gpu) {
        let speed = c.gflops.map_or(String::new(), |g| format!(", {g:.1} GFLOP/s in the race"));
        println!("matmul {class:<17} {} ({}{speed})", c.variant, c.source);
    }
    if let Some(f) = matmul_tune::cache_file() {
        println!("matmul choices are cached in {} (KILN_AUTOTUNE=off skips tuning)", f.display());
    }
}

fn selfcheck() -> Result<()> {
    let gpu = open_gpu()?;
    println!("Kiln self-check on {}", gpu.report());
    let lim = gpu.limits();
    println!(
        "limits: storage binding {}, buffer {}, workgroup memory {} KiB; timestamps: {}; subgroups: {}",
        mib(lim.max_storage_buffer_binding_size),
        mib(lim.max_buffer_size),
        lim.max_compute_workgroup_storage_size / 1024,
        gpu.has_timestamps(),
        gpu.has_subgroups()
    );
    println!("Every kernel against its CPU f64 reference:\n");
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
    print_matmul_choices(&gpu);
    Ok(())
}
