//! Small files that a crash or a power cut must leave whole: generated keys and
//! certificates, stored templates, state files. Each is written to a temporary file
//! beside it, fsynced, renamed over the old one, and the directory fsynced — so after
//! a crash at any moment the path holds the old version or the new one, never an
//! empty or torn file, and once this returns the new version survives a power cut.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary name `path` is written under before the rename: hidden, beside it
/// (a rename is atomic only within one file system), and recognisable so that a
/// leftover from a crash can be removed ([`remove_leftovers`]).
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.tmp"))
}

/// Writes `bytes` to `path` atomically and durably, with permission bits `mode` for
/// a new file (0o600 for secrets). The directory must exist.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = temporary_path(path);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Removes `path` durably (the directory is fsynced); a missing file is not an error.
pub fn remove_file(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// fsyncs a directory, which makes the creations, renames and removals in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Removes the temporary files a crash in [`write_file`] left in `dir`; returns how
/// many. They never hold anything that was reported written.
pub fn remove_leftovers(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_whole_files_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_file(&path, b"first", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        write_file(&path, b"second version", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second version");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["key.pem"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_crash_before_the_rename_leaves_the_old_version_and_a_leftover_to_remove() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_file(&path, b"old", 0o644).unwrap();
        // What a crash between the write of the temporary file and the rename leaves.
        std::fs::write(temporary_path(&path), b"new, torn").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        std::fs::write(dir.path().join("other.tmp"), b"not ours").unwrap();
        assert_eq!(remove_leftovers(dir.path()).unwrap(), 1);
        assert!(dir.path().join("other.tmp").exists());
        // The next write goes through although a leftover was there.
        std::fs::write(temporary_path(&path), b"again torn").unwrap();
        write_file(&path, b"new", 0o644).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!temporary_path(&path).exists());
    }

    #[test]
    fn a_failed_write_leaves_the_old_version_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        write_file(&path, b"old", 0o644).unwrap();
        // A directory where the temporary file should go makes the open fail.
        std::fs::create_dir(temporary_path(&path)).unwrap();
        assert!(write_file(&path, b"new", 0o644).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        remove_file(&path).unwrap();
        remove_file(&path).unwrap();
        assert!(!path.exists());
    }
}
