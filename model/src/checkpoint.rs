//! Safetensors I/O and checkpoint directories laid out like a Hugging Face GPT-2 repository
//! (`model.safetensors` + `config.json` + `tokenizer.json`), so other GPT-2 tools load Kiln's weights as they are
//! and Kiln loads theirs. Training state rides along in files those tools ignore.
//!
//! Every write is atomic: a crash or kill at any moment leaves either the previous complete file/checkpoint or the
//! new one, never a torn mix.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::arch::config::ModelConfig;
use crate::arch::{export_hf, import_hf};
use crate::atomic::{split_path, sync_dir, sync_dir_io, write_atomic_with, write_file_synced};
use crate::error::{io_err, ModelError, Result};

/// File names inside a checkpoint directory; the first three are what Hugging Face tools look for.
pub const MODEL_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAIN_STATE_FILE: &str = "train_state.json";

/// `transformers` refuses safetensors files whose metadata lacks `format` (or has an unknown one), so files meant
/// for it carry `format: pt`.
const HF_METADATA: [(&str, &str); 1] = [("format", "pt")];

/// A host copy of one tensor, row-major f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> HostTensor {
        HostTensor { name: name.into(), shape, data }
    }

    pub fn zeros(name: impl Into<String>, shape: Vec<usize>) -> HostTensor {
        let n = shape.iter().product();
        HostTensor { name: name.into(), shape, data: vec![0.0; n] }
    }

    /// Element count the shape implies (1 for a scalar `[]`).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn ckpt_err(path: impl Into<PathBuf>, message: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.into(), message: message.into() }
}

// ---------------------------------------------------------------------------------------------------------------
// safetensors files

struct F32View<'a>(&'a HostTensor);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        // safetensors is little-endian: on such hosts the f32 buffer already is the file's bytes, and borrowing it
        // avoids a second copy of a 500 MB embedding table.
        if cfg!(target_endian = "little") {
            Cow::Borrowed(bytemuck::cast_slice(&self.0.data))
        } else {
            Cow::Owned(self.0.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
    }

    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

/// Write tensors as safetensors (F32, names as given, optional string metadata), atomically: temp file in the same
/// directory, fsync, rename, fsync the directory. Files meant for `transformers` need `format: pt` in the metadata
/// (`save_checkpoint` adds it).
pub fn save_safetensors(path: &Path, tensors: &[HostTensor], metadata: &BTreeMap<String, String>) -> Result<()> {
    write_atomic_with(path, |tmp| write_safetensors_synced(tmp, tensors, metadata))
}

/// Write and fsync in place; callers provide atomicity (a temp name, or a temp directory).
fn write_safetensors_synced(path: &Path, tensors: &[HostTensor], metadata: &BTreeMap<String, String>) -> Result<()> {
    let mut seen = HashSet::new();
    for t in tensors {
        if t.name.is_empty() {
            return Err(ckpt_err(path, "a tensor has an empty name"));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(ckpt_err(path, format!("tensor {} appears twice", t.name)));
        }
        if t.data.len() != t.numel() {
            return Err(ckpt_err(
                path,
                format!(
                    "tensor {} has shape {:?} ({} values) but holds {} values",
                    t.name,
                    t.shape,
                    t.numel(),
                    t.data.len()
                ),
            ));
        }
    }
    let info: Option<HashMap<String, String>> =
        (!metadata.is_empty()).then(|| metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    safetensors::serialize_to_file(tensors.iter().map(|t| (t.name.as_str(), F32View(t))), info, path)
        .map_err(|e| ckpt_err(path, format!("writing safetensors failed: {e}")))?;
    OpenOptions::new().write(true).open(path).and_then(|f| f.sync_all()).map_err(io_err(path))
}

/// Read every tensor; F32, F16 and BF16 are converted to f32 (real GPT-2 files on the Hub are F32; others are
/// common). Clear error for other dtypes, naming the tensor. Tensors come in file order.
pub fn load_safetensors(path: &Path) -> Result<Vec<HostTensor>> {
    load_safetensors_with_metadata(path).map(|(tensors, _)| tensors)
}

/// `load_safetensors` plus the file's string metadata (`__metadata__`; empty when absent).
pub fn load_safetensors_with_metadata(path: &Path) -> Result<(Vec<HostTensor>, BTreeMap<String, String>)> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(ckpt_err(path, "missing file")),
        Err(e) => return Err(io_err(path)(e)),
    };
    let (header_len, header) =
        SafeTensors::read_metadata(&bytes).map_err(|e| ckpt_err(path, format!("not a safetensors file ({e})")))?;
    // read_metadata checked that the offsets tile the rest of the file exactly.
    let body = &bytes[8 + header_len..];
    let mut tensors = Vec::new();
    for name in header.offset_keys() {
        let info = header.info(&name).expect("offset_keys names come from the header");
        let raw = &body[info.data_offsets.0..info.data_offsets.1];
        let data: Vec<f32> = match info.dtype {
            Dtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(ckpt_err(
                    path,
                    format!("tensor {name} has dtype {other:?}; Kiln reads F32, F16 and BF16 tensors"),
                ))
            }
        };
        tensors.push(HostTensor { name, shape: info.shape.clone(), data });
    }
    let metadata = header.metadata().as_ref().map(|m| m.clone().into_iter().collect()).unwrap_or_default();
    Ok((tensors, metadata))
}

// ---------------------------------------------------------------------------------------------------------------
// checkpoint directories

/// What a Kiln checkpoint directory holds besides the model weights.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub step: u64,
    pub tokens_seen: u64,
    /// The data sampler's state (opaque here).
    pub sampler: serde_json::Value,
    /// Any other RNG state (opaque here).
    pub rng: serde_json::Value,
    /// Trainer-specific (lr schedule config, phase, ...).
    pub extra: serde_json::Value,
    /// Data-parallel ranks that trained it (1 alone; checkpoints from before data parallelism say nothing).
    #[serde(default = "one_rank")]
    pub ranks: usize,
}

fn one_rank() -> usize {
    1
}

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub config: ModelConfig,
    /// Kiln's parameter names, in `arch::param_table` order (what `Model::to_host` gives). The file holds them
    /// under Hugging Face names and layouts (`arch::export_hf`); `load_checkpoint` converts back.
    pub model: Vec<HostTensor>,
    /// E.g. "<param name>.m", "<param name>.v"; may be empty (weights-only export).
    pub optimizer: Vec<HostTensor>,
    pub state: Option<TrainState>,
    pub tokenizer_json: Option<String>,
}

/// Write DIR atomically as a whole: build DIR.tmp-<pid> with model.safetensors (the weights: HF names, no optimizer),
/// config.json (config.to_hf_json()), tokenizer.json (if given), optimizer.safetensors (if non-empty) +
/// train_state.json (if given); fsync every file and the directory; then swap: rename an existing DIR to
/// DIR.old-<pid>, rename the temp to DIR, remove the old one. A kill at any moment leaves either the previous complete
/// checkpoint or the new one, findable by `load_checkpoint`.
///
/// The model tensors must match the config exactly (what `load_checkpoint` demands), and an existing DIR is only
/// replaced if it looks like a checkpoint (config.json or model.safetensors inside, or empty), so a mistyped path
/// cannot delete unrelated data. After a successful swap, leftovers of earlier crashed saves of the same DIR
/// (DIR.tmp-*, DIR.old-*) are removed; concurrent saves to one DIR are not supported.
pub fn save_checkpoint(dir: &Path, ckpt: &Checkpoint) -> Result<()> {
    save_checkpoint_until(dir, ckpt, None)
}

/// Points where tests stop a save, standing in for a kill there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SaveStage {
    /// The temp directory holds only model.safetensors.
    ModelWritten,
    /// The temp directory is complete and synced; DIR untouched.
    TempComplete,
    /// The previous DIR has been renamed to DIR.old-<pid>; DIR is missing.
    OldMovedAside,
    /// The new checkpoint is DIR; DIR.old-<pid> still exists.
    NewInPlace,
}

fn save_checkpoint_until(dir: &Path, ckpt: &Checkpoint, stop_at: Option<SaveStage>) -> Result<()> {
    let stop = |s: SaveStage| stop_at == Some(s);
    let (parent, name) = split_path(dir)?;
    ckpt.config.validate()?;
    let hf = export_hf(&ckpt.config, &ckpt.model).map_err(|e| ckpt_err(dir, schema_message(e)))?;
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let had_previous = match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {
            if !looks_like_checkpoint(dir)? {
                return Err(ckpt_err(
                    dir,
                    format!("refusing to replace a directory that holds neither {CONFIG_FILE} nor {MODEL_FILE}"),
                ));
            }
            true
        }
        Ok(_) => {
            return Err(ckpt_err(dir, "exists and is not a directory (a file or a symlink): refusing to replace it"))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => false,
        Err(e) => return Err(io_err(dir)(e)),
    };

    let pid = std::process::id();
    let tmp = parent.join(format!("{name}.tmp-{pid}"));
    let old = parent.join(format!("{name}.old-{pid}"));
    if tmp.exists() {
        // A crashed run that had our pid; it never became DIR, so nothing of value is in it.
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    match write_checkpoint_files(&tmp, ckpt, &hf, &stop) {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    }
    if stop(SaveStage::TempComplete) {
        return Ok(());
    }

    if had_previous {
        if old.exists() {
            // Only reachable when DIR exists, so this stale copy is superseded by DIR.
            fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        if let Err(e) = fs::rename(dir, &old).and_then(|()| sync_dir_io(&parent)) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(io_err(dir)(e));
        }
    }
    if stop(SaveStage::OldMovedAside) {
        return Ok(());
    }
    if let Err(e) = fs::rename(&tmp, dir).and_then(|()| sync_dir_io(&parent)) {
        // Put the previous checkpoint back where readers look first; load_checkpoint finds it as DIR.old-* anyway.
        if had_previous && !dir.exists() {
            let _ = fs::rename(&old, dir);
        }
        return Err(io_err(dir)(e));
    }
    if stop(SaveStage::NewInPlace) {
        return Ok(());
    }
    if had_previous {
        fs::remove_dir_all(&old).map_err(|e| {
            ckpt_err(dir, format!("saved, but could not remove the previous checkpoint {}: {e}", old.display()))
        })?;
    }
    for stale in leftover_dirs(&parent, &name, ".tmp-").into_iter().chain(leftover_dirs(&parent, &name, ".old-")) {
        // Best effort: a leftover that cannot be removed never shadows DIR.
        let _ = fs::remove_dir_all(stale);
    }
    sync_dir(&parent)
}

/// Returns Ok(true) when a test asked to stop half way.
fn write_checkpoint_files(
    tmp: &Path,
    ckpt: &Checkpoint,
    hf: &[HostTensor],
    stop: &dyn Fn(SaveStage) -> bool,
) -> Result<bool> {
    let hf_meta: BTreeMap<String, String> = HF_METADATA.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    write_safetensors_synced(&tmp.join(MODEL_FILE), hf, &hf_meta)?;
    if stop(SaveStage::ModelWritten) {
        return Ok(true);
    }
    let config = serde_json::to_vec_pretty(&ckpt.config.to_hf_json()).expect("a JSON value serialises");
    write_file_synced(&tmp.join(CONFIG_FILE), &config)?;
    if let Some(tok) = &ckpt.tokenizer_json {
        write_file_synced(&tmp.join(TOKENIZER_FILE), tok.as_bytes())?;
    }
    if !ckpt.optimizer.is_empty() {
        write_safetensors_synced(&tmp.join(OPTIMIZER_FILE), &ckpt.optimizer, &hf_meta)?;
    }
    if let Some(state) = &ckpt.state {
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| ckpt_err(tmp.join(TRAIN_STATE_FILE), format!("cannot serialise train state: {e}")))?;
        write_file_synced(&tmp.join(TRAIN_STATE_FILE), &json)?;
    }
    sync_dir(tmp)?;
    Ok(false)
}

fn looks_like_checkpoint(dir: &Path) -> Result<bool> {
    if dir.join(CONFIG_FILE).exists() || dir.join(MODEL_FILE).exists() {
        return Ok(true);
    }
    let mut entries = fs::read_dir(dir).map_err(io_err(dir))?;
    Ok(entries.next().is_none())
}

/// Sibling directories `NAME<marker><digits>` (DIR.tmp-<pid>, DIR.old-<pid>) in `parent`.
fn leftover_dirs(parent: &Path, name: &str, marker: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}{marker}");
    let Ok(entries) = fs::read_dir(parent) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| {
            let file_name = e.file_name();
            let Some(rest) = file_name.to_str().and_then(|s| s.strip_prefix(&prefix)) else { return false };
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) && e.path().is_dir()
        })
        .map(|e| e.path())
        .collect()
}

/// Config from config.json (`ModelConfig::from_hf_json`: gpt2, llama or qwen2); model weights from
/// model.safetensors or the shards a `model.safetensors.index.json` lists (F32, F16 or BF16), converted by the
/// family's schema (`arch::import_hf`) and returned in table order, so a directory downloaded from the
/// Hub loads too. Optimizer, train state and tokenizer are optional. When DIR is missing (a save was killed between
/// its two renames) the newest complete DIR.old-* is loaded; DIR.tmp-* leftovers are never read.
pub fn load_checkpoint(dir: &Path) -> Result<Checkpoint> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => load_checkpoint_dir(dir),
        Ok(_) => Err(ckpt_err(dir, "is not a directory")),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let (parent, name) = split_path(dir)?;
            let mut candidates: Vec<(std::time::SystemTime, PathBuf)> = leftover_dirs(&parent, &name, ".old-")
                .into_iter()
                .map(|p| (fs::metadata(&p).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), p))
                .collect();
            candidates.sort_by(|a, b| b.cmp(a));
            let mut failures = Vec::new();
            for (_, candidate) in candidates {
                match load_checkpoint_dir(&candidate) {
                    Ok(c) => return Ok(c),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            let mut message =
                format!("no checkpoint: the directory is missing and no complete {name}.old-* is beside it");
            if !failures.is_empty() {
                message.push_str(&format!(" (rejected: {})", failures.join("; ")));
            }
            Err(ckpt_err(dir, message))
        }
        Err(e) => Err(io_err(dir)(e)),
    }
}

fn load_checkpoint_dir(dir: &Path) -> Result<Checkpoint> {
    let config_path = dir.join(CONFIG_FILE);
    let config_text = match fs::read(&config_path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(ckpt_err(dir, format!("missing {CONFIG_FILE}"))),
        Err(e) => return Err(io_err(&config_path)(e)),
    };
    let config_json: serde_json::Value = serde_json::from_slice(&config_text)
        .map_err(|e| ckpt_err(&config_path, format!("{CONFIG_FILE} is not valid JSON: {e}")))?;
    let config = ModelConfig::from_hf_json(&config_json).map_err(|e| ckpt_err(&config_path, e.to_string()))?;

    let (model_path, hf) = load_model_tensors(dir)?;
    let model = import_hf(&config, hf).map_err(|e| ckpt_err(&model_path, schema_message(e)))?;

    let optimizer_path = dir.join(OPTIMIZER_FILE);
    let optimizer = if optimizer_path.exists() { load_safetensors(&optimizer_path)? } else { Vec::new() };

    let state_path = dir.join(TRAIN_STATE_FILE);
    let state = match fs::read(&state_path) {
        Ok(bytes) => Some(
            serde_json::from_slice(&bytes)
                .map_err(|e| ckpt_err(&state_path, format!("{TRAIN_STATE_FILE} is not a valid train state: {e}")))?,
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(&state_path)(e)),
    };

    let tokenizer_path = dir.join(TOKENIZER_FILE);
    let tokenizer_json = match fs::read_to_string(&tokenizer_path) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(&tokenizer_path)(e)),
    };
    Ok(Checkpoint { config, model, optimizer, state, tokenizer_json })
}

/// The message of a schema error, without its placeholder path (the caller names the file).
fn schema_message(e: ModelError) -> String {
    match e {
        ModelError::Checkpoint { message, .. } => message,
        other => other.to_string(),
    }
}

/// The Hub's index of a sharded checkpoint: tensor name → shard file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Every tensor of DIR's weights, from model.safetensors or, when absent, the shards of model.safetensors.index.json;
/// returns the path errors should name with them.
fn load_model_tensors(dir: &Path) -> Result<(PathBuf, Vec<HostTensor>)> {
    let model_path = dir.join(MODEL_FILE);
    if model_path.exists() {
        return Ok((model_path.clone(), load_safetensors(&model_path)?));
    }
    let index_path = dir.join(INDEX_FILE);
    if !index_path.exists() {
        let hint = if dir.join("pytorch_model.bin").exists() {
            " (pytorch_model.bin is there, but Kiln reads only safetensors)"
        } else {
            ""
        };
        return Err(ckpt_err(dir, format!("missing {MODEL_FILE} (and no {INDEX_FILE}){hint}")));
    }
    let text = fs::read(&index_path).map_err(io_err(&index_path))?;
    let index: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| ckpt_err(&index_path, format!("{INDEX_FILE} is not valid JSON: {e}")))?;
    let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(ckpt_err(&index_path, "has no weight_map object"));
    };
    let mut shards: Vec<&str> = Vec::new();
    for (name, file) in map {
        let Some(file) = file.as_str().filter(|f| !f.contains('/') && !f.contains('\\') && *f != "..") else {
            return Err(ckpt_err(
                &index_path,
                format!("weight_map entry {name} is not a file name in {}", dir.display()),
            ));
        };
        if !shards.contains(&file) {
            shards.push(file);
        }
    }
    let mut tensors = Vec::new();
    for file in shards {
        let shard: Vec<HostTensor> = load_safetensors(&dir.join(file))?;
        // A tensor in a shard the index does not assign to it would be loaded twice or from the wrong file.
        if let Some(t) = shard.iter().find(|t| map.get(&t.name).and_then(|f| f.as_str()) != Some(file)) {
            return Err(ckpt_err(
                &index_path,
                format!("{file} holds {}, which the weight_map does not assign to it", t.name),
            ));
        }
        tensors.extend(shard);
    }
    if tensors.len() != map.len() {
        return Err(ckpt_err(
            &index_path,
            format!("weight_map names {} tensors but the shards hold {}", map.len(), tensors.len()),
        ));
    }
    Ok((index_path, tensors))
}

#[cfg(test)]
#[path = "checkpoint_tests.rs"]
mod tests;
