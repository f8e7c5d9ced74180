//! The crate's one way to write files that must survive a crash: everything goes to a temporary sibling, is
//! fsynced, renamed over the target and the directory fsynced, so a kill at any moment leaves the old file or the
//! whole new one. Checkpoint directories (checkpoint.rs) build on the same pieces.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{io_err, ModelError, Result};

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| write_file_synced(tmp, bytes))
}

/// Atomically replace `path` with what `write` puts (and fsyncs) at the temporary path it is given.
pub(crate) fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_sibling(path, "tmp")?;
    let parent = split_path(path)?.0;
    let result =
        write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(io_err(path))).and_then(|()| sync_dir(&parent));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A name beside `path` no other writer uses: `.NAME.KIND-PID-SEQ`.
fn temp_sibling(path: &Path, kind: &str) -> Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let (parent, name) = split_path(path)?;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    Ok(parent.join(format!(".{name}.{kind}-{}-{seq}", std::process::id())))
}

/// The parent directory ("." for a bare name) and the UTF-8 final component, from which sibling temp names are made.
pub(crate) fn split_path(path: &Path) -> Result<(PathBuf, String)> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        ModelError::Data(format!(
            "{}: needs a final path component in UTF-8 (a name, not \"..\" or \"/\")",
            path.display()
        ))
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_string()))
}

/// Write and fsync in place; callers provide atomicity (a temp name, or a temp directory).
pub(crate) fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io_err(path))
}

/// Makes renames and new entries in `dir` durable; without it a power cut can lose a rename that already returned.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    sync_dir_io(dir).map_err(io_err(dir))
}

pub(crate) fn sync_dir_io(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        // Directories cannot be opened as files here; NTFS journals renames itself.
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporaries() {
        let dir = std::env::temp_dir().join(format!("kiln-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.txt");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        // A writer that fails leaves the old file and no temporary behind.
        let e = write_atomic_with(&path, |tmp| {
            write_file_synced(tmp, b"torn")?;
            Err(ModelError::Data("disk full".into()))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f.txt")]);
        assert!(write_atomic(Path::new("/"), b"x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
