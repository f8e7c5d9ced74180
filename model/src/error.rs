//! Errors of the model crate: every message says what was wrong with which input, so nothing is lost silently.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Engine(#[from] kiln_engine::Error),

    /// The I/O error is part of the message, not a `source`, so a printed cause chain does not repeat it.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    #[error("invalid model configuration: {0}")]
    Config(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("data: {0}")]
    Data(String),

    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },

    #[error(
        "{} is in use by another Kiln run ({owner}); wait for it to finish, stop it, or choose another output \
         directory",
        dir.display()
    )]
    RunDirBusy { dir: PathBuf, owner: String },

    #[error("training diverged: {what} is {value} at step {step}")]
    NonFinite { what: &'static str, value: f32, step: u64 },
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Attach the path to an I/O error.
pub fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.into();
    move |error| ModelError::Io { path, error }
}
