//! The IP warm-up budgets of the whole process (`gannet_core::warmup`), shared by
//! every shard, and their file: today's counts are written to
//! `<data_dir>/warmup.json` (atomically and durably) by shard 0's periodic round
//! (every 100 ms to 500 ms) when they changed, and when gannetd stops, and read back at start-up, so that a restart
//! does not hand a provider a new day's budget. A crash loses at most the counts
//! since the last write.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use gannet_core::warmup::{Budgets, Saved};

#[derive(Debug)]
pub struct Warmup {
    pub budgets: Budgets,
    file: PathBuf,
    /// What the file holds now (one write at a time).
    written: Mutex<Saved>,
}

impl Warmup {
    /// The budgets of `config`, with today's counts from the file in `data_dir`. A
    /// file that cannot be parsed is an error naming it, its line and column.
    pub fn load(
        config: &gannet_core::config::DeliveryConfig,
        data_dir: &Path,
        now_ms: u64,
    ) -> Result<Warmup, String> {
        let budgets = Budgets::new(config);
        let file = data_dir.join("warmup.json");
        let saved = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice::<Saved>(&bytes).map_err(|err| {
                format!(
                    "{}:{}:{}: {err} (the IP warm-up counts of today; fix or remove the file)",
                    file.display(),
                    err.line(),
                    err.column()
                )
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(err) => return Err(format!("{}: {err}", file.display())),
        };
        budgets.restore(&saved, now_ms);
        Ok(Warmup {
            budgets,
            file,
            written: Mutex::new(saved),
        })
    }

    /// Writes today's counts if they changed since the last write. Blocks on a
    /// disk sync: run it off the executor.
    pub fn save(&self, now_ms: u64) -> std::io::Result<()> {
        if self.budgets.is_empty() {
            return Ok(());
        }
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.budgets.save(now_ms);
        if *written == now {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(&now).map_err(std::io::Error::other)?;
        gannet_spool::durable::write_file(&self.file, &bytes, 0o644)?;
        *written = now;
        Ok(())
    }
}
