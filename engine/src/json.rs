//! JSON shared by several modules: request bodies (an error that names where in
//! the document it is), and the append-only JSON-lines logs of small stores (read
//! back with a torn last line skipped, rewritten whole when they grow stale).

/// A JSON error with the path of the value it is about (`content.subject: invalid
/// type …`).
pub fn describe_error(
    err: serde_path_to_error::Error<serde_json::Error>,
) -> (serde_json::Error, String) {
    let path = err.path().to_string();
    let inner = err.into_inner();
    let description = if path == "." || path.is_empty() {
        inner.to_string()
    } else {
        format!("{path}: {inner}")
    };
    (inner, description)
}

/// An append-only log of JSON lines as read back: its values, how many lines it
/// had, and whether its last line was torn (written in part when the process died:
/// no newline at the end, and it does not parse — skipped, with a warning).
#[derive(Debug)]
pub struct Log<T> {
    pub values: Vec<T>,
    pub lines: usize,
    pub torn: bool,
}

/// Reads the log at `path` (none yet: empty). Any other line that does not parse
/// is an error naming the file and the line.
pub fn read_log<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> anyhow::Result<Log<T>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => anyhow::bail!("{}: {err}", path.display()),
    };
    let text = String::from_utf8_lossy(&bytes);
    let count = text.lines().count();
    let mut log = Log {
        values: Vec::with_capacity(count),
        lines: count,
        torn: false,
    };
    for (i, line) in text.lines().enumerate() {
        match serde_json::from_str::<T>(line) {
            Ok(value) => log.values.push(value),
            Err(_) if i + 1 == count && !bytes.ends_with(b"\n") => {
                tracing::warn!(file = %path.display(), "log ends in a torn line; ignored");
                log.torn = true;
            }
            Err(err) => anyhow::bail!("{}:{}: {err}", path.display(), i + 1),
        }
    }
    Ok(log)
}

/// Replaces the log at `path` with `values`, one line each, atomically and durably
/// (a log of mostly superseded lines, or with a torn end).
pub fn rewrite_log<T: serde::Serialize>(
    path: &std::path::Path,
    values: impl IntoIterator<Item = T>,
) -> anyhow::Result<()> {
    let mut text = Vec::new();
    for value in values {
        serde_json::to_writer(&mut text, &value)?;
        text.push(b'\n');
    }
    gannet_spool::durable::write_file(path, &text, 0o600)?;
    Ok(())
}
