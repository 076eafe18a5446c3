//! Suppression lists: per tenant, recipients that get no mail of a kind
//! (transactional, non-transactional), as SparkPost keeps them.
//!
//! Every shard consults them at injection, so the lookup is cheap and shared: 64
//! buckets, each a map behind its own read-write lock (a lookup takes one bucket's
//! read lock; a writer holds one bucket briefly), and none at all while the lists are
//! empty. Entries are kept in memory and in `<data_dir>/suppression-list.jsonl`, an
//! append-only log of puts and deletes: a change made through the API is written and
//! fsynced before it is answered; entries added by gannet itself (hard bounces,
//! complaints, unsubscribes) are written by a flusher within a second (a crash may
//! lose the last second of them; the event that caused each is in the event log). A
//! torn last line is ignored at start-up, and a log with many superseded lines is
//! rewritten whole (temporary file, fsync, rename) before use.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::hash::BuildHasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

const BUCKETS: usize = 64;
const FILE: &str = "suppression-list.jsonl";

/// The two kinds of mail an entry may suppress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Transactional,
    NonTransactional,
}

impl Kind {
    pub fn of(transactional: bool) -> Kind {
        if transactional {
            Kind::Transactional
        } else {
            Kind::NonTransactional
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Transactional => "transactional",
            Kind::NonTransactional => "non_transactional",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        match name {
            "transactional" => Some(Kind::Transactional),
            "non_transactional" => Some(Kind::NonTransactional),
            _ => None,
        }
    }
}

/// One entry: a recipient suppressed for one kind of mail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Lower case.
    pub recipient: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// "Manually Added", "Bounce Rule", "Spam Complaint", "Unsubscribe", …
    pub source: String,
    #[serde(default)]
    pub description: String,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// A line of the log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    Put(Entry),
    Delete {
        recipient: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
        #[serde(rename = "type")]
        kind: Kind,
    },
}

type Key = (String, String, Kind);

fn key(tenant: Option<&str>, recipient: &str, kind: Kind) -> Key {
    (
        tenant.unwrap_or("").to_string(),
        recipient.to_ascii_lowercase(),
        kind,
    )
}

/// The lists of every tenant.
#[derive(Debug)]
pub struct Suppressions {
    buckets: Box<[RwLock<HashMap<Key, Entry>>]>,
    hasher: std::collections::hash_map::RandomState,
    entries: AtomicUsize,
    entries_max: usize,
    path: PathBuf,
    log: Mutex<File>,
    /// Lines of entries gannet added itself, for the flusher.
    unwritten: Arc<Mutex<Vec<u8>>>,
}

/// Why a change was refused.
#[derive(Debug)]
pub enum Refused {
    Full(usize),
    Io(std::io::Error),
}

impl Suppressions {
    /// Loads the lists from `<data_dir>/suppression-list.jsonl` and starts the
    /// flusher thread.
    pub fn open(data_dir: &Path, entries_max: usize) -> anyhow::Result<Arc<Suppressions>> {
        let path = data_dir.join(FILE);
        let log = crate::json::read_log::<Op>(&path)?;
        let mut map: HashMap<Key, Entry> = HashMap::new();
        for op in log.values {
            match op {
                Op::Put(entry) => {
                    let k = key(entry.tenant.as_deref(), &entry.recipient, entry.kind);
                    map.insert(k, entry);
                }
                Op::Delete {
                    recipient,
                    tenant,
                    kind,
                } => {
                    map.remove(&key(tenant.as_deref(), &recipient, kind));
                }
            }
        }
        if log.lines > 2 * map.len() + 1000 || log.torn {
            // Mostly superseded lines (or a torn tail): rewrite it whole.
            crate::json::rewrite_log(&path, map.values().map(|e| Op::Put(e.clone())))?;
        }
        let log = OpenOptions::new().create(true).append(true).open(&path)?;
        let hasher = std::collections::hash_map::RandomState::new();
        let buckets: Vec<RwLock<HashMap<Key, Entry>>> =
            (0..BUCKETS).map(|_| RwLock::new(HashMap::new())).collect();
        let entries = map.len();
        let suppressions = Arc::new(Suppressions {
            buckets: buckets.into_boxed_slice(),
            hasher,
            entries: AtomicUsize::new(entries),
            entries_max,
            path,
            log: Mutex::new(log),
            unwritten: Arc::new(Mutex::new(Vec::new())),
        });
        for (k, entry) in map {
            suppressions
                .bucket(&k)
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(k, entry);
        }
        let weak = Arc::downgrade(&suppressions);
        std::thread::Builder::new()
            .name("gannet-suppress".into())
            .spawn(move || {
                // Ends when the lists are dropped.
                while let Some(lists) = weak.upgrade() {
                    lists.flush_unwritten();
                    drop(lists);
                    std::thread::sleep(Duration::from_millis(500));
                }
            })?;
        Ok(suppressions)
    }

    fn bucket(&self, k: &Key) -> &RwLock<HashMap<Key, Entry>> {
        &self.buckets[self.hasher.hash_one(k) as usize % BUCKETS]
    }

    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `recipient` of `tenant` gets no mail of `kind`. Free while the lists
    /// are empty; otherwise one lower-cased copy of the address (the key) and one
    /// bucket's read lock.
    pub fn is_suppressed(&self, tenant: Option<&str>, recipient: &str, kind: Kind) -> bool {
        if self.is_empty() {
            return false;
        }
        let k = key(tenant, recipient, kind);
        self.bucket(&k)
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&k)
    }

    /// The entries of `recipient` (both kinds).
    pub fn get(&self, tenant: Option<&str>, recipient: &str) -> Vec<Entry> {
        [Kind::Transactional, Kind::NonTransactional]
            .into_iter()
            .filter_map(|kind| {
                let k = key(tenant, recipient, kind);
                self.bucket(&k)
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&k)
                    .cloned()
            })
            .collect()
    }

    /// Every entry of `tenant` that `keep` keeps, newest change first.
    pub fn list(&self, tenant: Option<&str>, keep: impl Fn(&Entry) -> bool) -> Vec<Entry> {
        let mut found = Vec::new();
        for bucket in self.buckets.iter() {
            let bucket = bucket.read().unwrap_or_else(PoisonError::into_inner);
            found.extend(
                bucket
                    .values()
                    .filter(|e| e.tenant.as_deref() == tenant && keep(e))
                    .cloned(),
            );
        }
        found.sort_by(|a, b| {
            b.updated_ms
                .cmp(&a.updated_ms)
                .then(a.recipient.cmp(&b.recipient))
        });
        found
    }

    /// Puts entries (new, or replacing an entry of the same recipient and kind,
    /// whose creation time is kept), written and fsynced before it returns (blocking).
    pub fn put(&self, entries: Vec<Entry>) -> Result<(), Refused> {
        let mut text = Vec::new();
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let added = entries
            .iter()
            .filter(|e| {
                let k = key(e.tenant.as_deref(), &e.recipient, e.kind);
                !self
                    .bucket(&k)
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .contains_key(&k)
            })
            .count();
        if self.len() + added > self.entries_max {
            return Err(Refused::Full(self.entries_max));
        }
        let entries: Vec<Entry> = entries.into_iter().map(|e| self.keep_created(e)).collect();
        for entry in &entries {
            // An Entry always serialises.
            let _ = serde_json::to_writer(&mut text, &Op::Put(entry.clone()));
            text.push(b'\n');
        }
        log.write_all(&text)
            .and_then(|()| log.sync_data())
            .map_err(Refused::Io)?;
        for entry in entries {
            self.insert(entry);
        }
        Ok(())
    }

    /// Deletes `recipient`'s entries of `kinds`, written and fsynced before it
    /// returns (blocking); how many there were.
    pub fn delete(
        &self,
        tenant: Option<&str>,
        recipient: &str,
        kinds: &[Kind],
    ) -> Result<usize, Refused> {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let mut text = Vec::new();
        let mut found = Vec::new();
        for kind in kinds {
            let k = key(tenant, recipient, *kind);
            if self
                .bucket(&k)
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&k)
            {
                let _ = serde_json::to_writer(
                    &mut text,
                    &Op::Delete {
                        recipient: k.1.clone(),
                        tenant: tenant.map(str::to_string),
                        kind: *kind,
                    },
                );
                text.push(b'\n');
                found.push(k);
            }
        }
        if found.is_empty() {
            return Ok(0);
        }
        log.write_all(&text)
            .and_then(|()| log.sync_data())
            .map_err(Refused::Io)?;
        for k in &found {
            if self
                .bucket(k)
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(k)
                .is_some()
            {
                self.entries.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(found.len())
    }

    /// Adds an entry gannet decided on (a hard bounce, a complaint): in force at
    /// once, written by the flusher within a second. Never blocks on the disk. An
    /// existing entry of the same recipient and kind is left as it is.
    /// Adds an entry gannet makes itself (a bounce, a complaint, an unsubscribe):
    /// `tenant` empty for the untenanted, the recipient lower-cased.
    pub fn add_auto(
        &self,
        tenant: &str,
        recipient: &str,
        kind: Kind,
        source: &str,
        description: String,
        now: u64,
    ) {
        self.add_now(Entry {
            recipient: recipient.to_ascii_lowercase(),
            tenant: (!tenant.is_empty()).then(|| tenant.to_string()),
            kind,
            source: source.into(),
            description,
            created_ms: now,
            updated_ms: now,
        });
    }

    /// A hard bounce (`suppression.hard_bounce_classes`, in band or out of band)
    /// suppresses its recipient for all mail ("Bounce Rule"), unless turned off:
    /// true when it did.
    pub fn hard_bounce(
        &self,
        config: &gannet_core::config::SuppressionConfig,
        tenant: &str,
        recipient: &str,
        class: u16,
        description: String,
        now: u64,
    ) -> bool {
        if !config.auto_add_hard_bounces || !config.hard_bounce_classes.contains(&class) {
            return false;
        }
        for kind in [Kind::Transactional, Kind::NonTransactional] {
            let why = description.clone();
            self.add_auto(tenant, recipient, kind, "Bounce Rule", why, now);
        }
        true
    }

    pub fn add_now(&self, entry: Entry) {
        let k = key(entry.tenant.as_deref(), &entry.recipient, entry.kind);
        if self
            .bucket(&k)
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&k)
        {
            return;
        }
        if self.len() >= self.entries_max {
            tracing::warn!(recipient = %entry.recipient, "suppression list full (suppression.entries_max); not added");
            return;
        }
        {
            let mut unwritten = self
                .unwritten
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let _ = serde_json::to_writer(&mut *unwritten, &Op::Put(entry.clone()));
            unwritten.push(b'\n');
        }
        self.insert(entry);
    }

    fn insert(&self, entry: Entry) {
        let k = key(entry.tenant.as_deref(), &entry.recipient, entry.kind);
        let previous = self
            .bucket(&k)
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(k, entry);
        if previous.is_none() {
            self.entries.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An entry replacing another keeps the other's creation time.
    fn keep_created(&self, mut entry: Entry) -> Entry {
        let k = key(entry.tenant.as_deref(), &entry.recipient, entry.kind);
        if let Some(old) = self
            .bucket(&k)
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&k)
        {
            entry.created_ms = old.created_ms;
        }
        entry.recipient = k.1;
        entry
    }

    /// Writes (and syncs) the entries gannet added itself.
    pub fn flush_unwritten(&self) {
        let text = std::mem::take(
            &mut *self
                .unwritten
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if text.is_empty() {
            return;
        }
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(err) = log.write_all(&text).and_then(|()| log.sync_data()) {
            tracing::error!(file = %self.path.display(), "writing suppression entries: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(recipient: &str, tenant: Option<&str>, kind: Kind) -> Entry {
        Entry {
            recipient: recipient.into(),
            tenant: tenant.map(str::to_string),
            kind,
            source: "Manually Added".into(),
            description: String::new(),
            created_ms: 1,
            updated_ms: 1,
        }
    }

    #[test]
    fn entries_are_per_tenant_and_kind_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let lists = Suppressions::open(dir.path(), 10).unwrap();
        assert!(!lists.is_suppressed(None, "a@b.test", Kind::NonTransactional));
        lists
            .put(vec![
                entry("A@B.test", None, Kind::NonTransactional),
                entry("c@d.test", Some("acme"), Kind::Transactional),
            ])
            .unwrap();
        assert!(lists.is_suppressed(None, "a@b.TEST", Kind::NonTransactional));
        assert!(!lists.is_suppressed(None, "a@b.test", Kind::Transactional));
        assert!(!lists.is_suppressed(Some("acme"), "a@b.test", Kind::NonTransactional));
        assert!(lists.is_suppressed(Some("acme"), "c@d.test", Kind::Transactional));
        lists.add_now(entry("e@f.test", None, Kind::Transactional));
        assert!(lists.is_suppressed(None, "e@f.test", Kind::Transactional));
        lists.flush_unwritten();
        assert_eq!(
            lists
                .delete(
                    None,
                    "a@b.test",
                    &[Kind::Transactional, Kind::NonTransactional]
                )
                .unwrap(),
            1
        );
        assert_eq!(lists.len(), 2);
        drop(lists);
        // A torn line at the end is ignored.
        let path = dir.path().join(FILE);
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"op\":\"put\",\"recip");
        std::fs::write(&path, &text).unwrap();
        let lists = Suppressions::open(dir.path(), 10).unwrap();
        assert_eq!(lists.len(), 2);
        assert!(!lists.is_suppressed(None, "a@b.test", Kind::NonTransactional));
        assert!(lists.is_suppressed(None, "e@f.test", Kind::Transactional));
        assert_eq!(lists.get(Some("acme"), "C@D.test").len(), 1);
        assert_eq!(lists.list(None, |_| true).len(), 1);
        // The bound holds.
        let many: Vec<Entry> = (0..9)
            .map(|i| entry(&format!("x{i}@y.test"), None, Kind::Transactional))
            .collect();
        assert!(matches!(lists.put(many), Err(Refused::Full(10))));
    }

    #[test]
    fn a_damaged_line_in_the_middle_stops_the_start_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE),
            "nonsense\n{\"op\":\"delete\",\"recipient\":\"a\",\"type\":\"transactional\"}\n",
        )
        .unwrap();
        let err = Suppressions::open(dir.path(), 10).unwrap_err().to_string();
        assert!(err.contains("suppression-list.jsonl:1:"), "{err}");
    }
}
