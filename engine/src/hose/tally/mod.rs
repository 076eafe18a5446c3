//! The deliverability metrics behind SparkPost's Metrics API: a sink of the hose
//! that tallies every event it is given into the buckets of [`store`], which the
//! HTTP API queries ([`query`]).
//!
//! The tally is kept exactly once per event across crashes: each batch is appended
//! to a journal (`<data_dir>/metrics/journal`, one checksummed JSON line) together
//! with the log position it reaches, and the sink resumes from the positions the
//! journal holds, not from a cursor of its own. A line torn by a crash is cut at
//! open (its events are tallied again from the log). The journal is fdatasynced at
//! most once a second, as the event logs themselves are not synced: after a power
//! loss both go back together. When the journal outgrows the last snapshot (and 64
//! MiB), the whole state is written as a new snapshot (`snapshot.json`, atomically
//! and durably, with the positions) and the journal starts again empty; a journal
//! line at or behind the snapshot's positions is skipped at open, so a crash between
//! the two steps counts nothing twice.

pub mod query;
pub mod store;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::sparkpost::{Events, Filter, TypeSet};
use super::{BatchRef, Sink};
use gannet_core::bounce::{Category, category};
use gannet_core::config::MetricsApiConfig;
use store::{CLICKED, COUNTERS, Counter, Counts, DIMS, Dim, OPENED, Resolution, Store};

/// The sink's name (its metrics, the hose's cursor file).
pub const SINK: &str = "metrics";
/// The event types tallied.
const TYPES: &[&str] = &[
    "injection",
    "delivery",
    "bounce",
    "delay",
    "policy_rejection",
    "out_of_band",
    "spam_complaint",
    "generation_failure",
    "open",
    "click",
    "list_unsubscribe",
    "link_unsubscribe",
];
/// The journal is rewritten as a snapshot past this size (or the snapshot's).
const COMPACT_BYTES: u64 = 64 << 20;
const SYNC_EVERY: Duration = Duration::from_secs(1);
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The tallies and their files.
#[derive(Debug)]
pub struct Tally {
    store: RwLock<Store>,
    files: Mutex<Files>,
}

#[derive(Debug)]
struct Files {
    dir: PathBuf,
    journal: File,
    journal_bytes: u64,
    snapshot_bytes: u64,
    /// Per log: the position up to which its events are tallied.
    positions: Vec<u64>,
    last_sync: Instant,
    unsynced: bool,
    last_prune: Instant,
}

/// Counters as stored: (counter index, value) for the non-zero ones.
type Sparse = Vec<(u8, u64)>;

/// One journal line: a batch's additions and the position it reaches.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    log: usize,
    end: u64,
    /// Keys interned by this batch: (id, values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    keys: Vec<(u32, [String; DIMS])>,
    /// (minute, key, [(counter, n)]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    add: Vec<(u32, u32, Sparse)>,
    /// (message hash, flags) newly known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    engaged: Vec<(u64, u8)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    positions: Vec<u64>,
    folded: u64,
    keys: Vec<[String; DIMS]>,
    /// (resolution: 0 minute, 1 hour, 2 day; bucket start; key; [(counter, n)]).
    rows: Vec<(u8, u32, u32, Sparse)>,
    engaged: Vec<(u64, u8)>,
}

fn sparse(counts: &Counts) -> Sparse {
    counts
        .iter()
        .enumerate()
        .filter(|(_, n)| **n != 0)
        .map(|(i, n)| (i as u8, *n))
        .collect()
}

fn dense(pairs: &[(u8, u64)]) -> Counts {
    let mut counts = [0; COUNTERS];
    for (i, n) in pairs {
        if let Some(c) = counts.get_mut(usize::from(*i)) {
            *c = *n;
        }
    }
    counts
}

pub fn now_minute() -> u32 {
    (gannet_core::clock::unix_ms() / 60_000) as u32
}

impl Tally {
    /// Opens (or makes) `<data_dir>/metrics` for `logs` event logs.
    pub fn open(data_dir: &Path, logs: usize, config: &MetricsApiConfig) -> std::io::Result<Tally> {
        let dir = data_dir.join("metrics");
        std::fs::create_dir_all(&dir)?;
        let limits = store::Limits {
            keys_max: config.keys_max.usize(),
            engaged_max: config.engaged_messages_max.usize(),
            retention: [
                config.minute_retention_hours.get() as u32 * 60,
                config.hour_retention_days.get() as u32 * 1440,
                config.retention_days.get() as u32 * 1440,
            ],
        };
        let now = now_minute();
        let mut store = Store::new(limits);
        let mut positions = vec![0; logs];
        let snapshot_path = dir.join("snapshot.json");
        let mut snapshot_bytes = 0;
        match std::fs::read(&snapshot_path) {
            Ok(bytes) => {
                snapshot_bytes = bytes.len() as u64;
                match serde_json::from_slice::<Snapshot>(&bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|s| restore(&mut store, s, &mut positions, now))
                {
                    Ok(()) => {}
                    Err(err) => {
                        // Not a torn file (it is replaced atomically): damaged. The
                        // tally starts again from what the event logs still hold.
                        tracing::error!(file = %snapshot_path.display(),
                            "the metrics snapshot is damaged ({err}); set aside as .bad, tallying again from the event logs");
                        let _ = std::fs::rename(&snapshot_path, dir.join("snapshot.json.bad"));
                        store = Store::new(limits);
                        positions = vec![0; logs];
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let journal_path = dir.join("journal");
        let journal_bytes = match replay(&journal_path, &mut store, &mut positions, now) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::InvalidData => {
                // The journal and the snapshot disagree (files from different
                // states): both are set aside and the tally starts again from what
                // the event logs hold.
                tracing::error!(dir = %dir.display(),
                    "the metrics journal does not follow its snapshot ({err}); both set aside as .bad, tallying again from the event logs");
                let _ = std::fs::rename(&journal_path, dir.join("journal.bad"));
                let _ = std::fs::rename(&snapshot_path, dir.join("snapshot.json.bad"));
                store = Store::new(limits);
                positions = vec![0; logs];
                snapshot_bytes = 0;
                0
            }
            Err(err) => return Err(err),
        };
        let journal = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal_path)?;
        gannet_spool::durable::sync_dir(&dir)?;
        store.prune(now);
        Ok(Tally {
            store: RwLock::new(store),
            files: Mutex::new(Files {
                dir,
                journal,
                journal_bytes,
                snapshot_bytes,
                positions,
                last_sync: Instant::now(),
                unsynced: false,
                last_prune: Instant::now(),
            }),
        })
    }

    /// Reads the tallies.
    pub fn read<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        f(&self.store.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn positions(&self) -> Vec<u64> {
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .positions
            .clone()
    }

    /// Tallies a batch of `log` that ends at `end`: journaled, then applied.
    fn add_batch(&self, log: usize, end: u64, events: &Events) -> std::io::Result<()> {
        let now = now_minute();
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        let mut store = self.store.write().unwrap_or_else(PoisonError::into_inner);
        let keys_before = store.keys().len();
        let mut rows: HashMap<(u32, u32), Counts> = HashMap::new();
        let mut engaged: HashMap<u64, u8> = HashMap::new();
        let mut engaged_order = Vec::new();
        for item in &events.items {
            let Some(fields) = inner(events.object(item))
                .and_then(|inner| serde_json::from_slice::<Fields<'_>>(inner).ok())
            else {
                continue;
            };
            let mut counts = [0; COUNTERS];
            let Some(key) = tally(&fields, &mut counts, |hash, flags| {
                let known = engaged
                    .get(&hash)
                    .copied()
                    .unwrap_or_else(|| store.engaged(hash));
                if known & flags != flags {
                    if !engaged.contains_key(&hash) {
                        engaged_order.push(hash);
                    }
                    engaged.insert(hash, known | flags);
                }
                known
            }) else {
                continue;
            };
            let values: [&str; DIMS] = std::array::from_fn(|i| key[i].as_ref());
            let id = match store.intern(values) {
                Ok(id) | Err(id) => id,
            };
            let minute = u32::try_from(item.timestamp_ms / 60_000).unwrap_or(u32::MAX);
            let row = rows.entry((minute, id)).or_insert([0; COUNTERS]);
            for (total, n) in row.iter_mut().zip(counts) {
                *total = total.saturating_add(n);
            }
        }
        let record = Record {
            log,
            end,
            keys: store.keys()[keys_before..]
                .iter()
                .enumerate()
                .map(|(i, k)| ((keys_before + i) as u32, k.clone().map(|v| v.to_string())))
                .collect(),
            add: rows
                .iter()
                .map(|(&(minute, key), counts)| (minute, key, sparse(counts)))
                .collect(),
            engaged: engaged_order
                .iter()
                .map(|h| (*h, engaged.get(h).copied().unwrap_or(0)))
                .collect(),
        };
        if let Err(err) = files.append(&record) {
            store.truncate_keys(keys_before);
            return Err(err);
        }
        for ((minute, key), counts) in &rows {
            store.add(*minute, *key, counts, now);
        }
        for (hash, flags) in &record.engaged {
            store.set_engaged(*hash, *flags);
        }
        if let Some(p) = files.positions.get_mut(log) {
            *p = end;
        }
        if files.last_prune.elapsed() >= PRUNE_EVERY {
            files.last_prune = Instant::now();
            store.prune(now);
        }
        if files.journal_bytes > COMPACT_BYTES.max(files.snapshot_bytes) {
            files.compact(&store)?;
        }
        Ok(())
    }
}

fn restore(
    store: &mut Store,
    snapshot: Snapshot,
    positions: &mut [u64],
    now: u32,
) -> Result<(), String> {
    if snapshot.version != 1 {
        return Err(format!("unknown version {}", snapshot.version));
    }
    for (id, key) in snapshot.keys.iter().enumerate() {
        let values: [&str; DIMS] = std::array::from_fn(|i| key[i].as_str());
        store.restore_key(id as u32, values);
    }
    for (resolution, start, key, counts) in snapshot.rows {
        let resolution = *Resolution::ALL
            .get(usize::from(resolution))
            .ok_or("a row of an unknown resolution")?;
        if key as usize >= store.keys().len() {
            return Err(format!(
                "a row of key {key}, which the snapshot does not have"
            ));
        }
        store.restore_row(resolution, start, key, dense(&counts));
    }
    for (hash, flags) in snapshot.engaged {
        store.set_engaged(hash, flags);
    }
    store.folded = snapshot.folded;
    for (p, s) in positions.iter_mut().zip(&snapshot.positions) {
        *p = *s;
    }
    store.prune(now);
    Ok(())
}

/// Applies the journal's records past `positions`; cuts a torn or damaged tail.
/// Returns the journal's length.
fn replay(path: &Path, store: &mut Store, positions: &mut [u64], now: u32) -> std::io::Result<u64> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut reader = std::io::BufReader::new(file);
    let mut good = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        let Some(record) = parse_line(&line) else {
            tracing::warn!(file = %path.display(), offset = good,
                "the metrics journal ends in a torn or damaged line; cut there (those events are tallied again from the logs)");
            let file = std::fs::OpenOptions::new().write(true).open(path)?;
            file.set_len(good)?;
            file.sync_all()?;
            break;
        };
        good += n as u64;
        // Keys first, whatever the record's position: later records name them (a
        // record behind the snapshot holds keys the snapshot has already).
        for (id, values) in &record.keys {
            let values: [&str; DIMS] = std::array::from_fn(|i| values[i].as_str());
            if !store.restore_key(*id, values) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("key {id} does not follow the snapshot"),
                ));
            }
        }
        let Some(position) = positions.get_mut(record.log) else {
            continue;
        };
        if record.end <= *position {
            // Behind the snapshot (written just before a crash cut the journal).
            continue;
        }
        *position = record.end;
        for (minute, key, counts) in &record.add {
            store.add(*minute, *key, &dense(counts), now);
        }
        for (hash, flags) in &record.engaged {
            store.set_engaged(*hash, *flags);
        }
    }
    Ok(good)
}

/// `<crc32c of the JSON, 8 hex digits> <JSON>\n`.
fn parse_line(line: &[u8]) -> Option<Record> {
    let line = line.strip_suffix(b"\n")?;
    let (crc, json) = line.split_at_checked(9)?;
    let crc = std::str::from_utf8(crc.strip_suffix(b" ")?).ok()?;
    if u32::from_str_radix(crc, 16).ok()? != crc32c::crc32c(json) {
        return None;
    }
    serde_json::from_slice(json).ok()
}

impl Files {
    fn append(&mut self, record: &Record) -> std::io::Result<()> {
        let json = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        let mut line = format!("{:08x} ", crc32c::crc32c(&json)).into_bytes();
        line.extend_from_slice(&json);
        line.push(b'\n');
        if let Err(err) = self.journal.write_all(&line) {
            // A partial line is cut so the next append starts clean.
            let _ = self.journal.set_len(self.journal_bytes);
            return Err(err);
        }
        self.journal_bytes += line.len() as u64;
        self.unsynced = true;
        if self.last_sync.elapsed() >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    fn sync(&mut self) -> std::io::Result<()> {
        if self.unsynced {
            self.journal.sync_data()?;
            self.unsynced = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Writes the whole state as the snapshot, then empties the journal.
    fn compact(&mut self, store: &Store) -> std::io::Result<()> {
        let started = Instant::now();
        let mut rows = Vec::new();
        for (r, resolution) in Resolution::ALL.iter().enumerate() {
            for (start, keys) in store.buckets(*resolution) {
                for (key, counts) in keys {
                    rows.push((r as u8, *start, *key, sparse(counts)));
                }
            }
        }
        let snapshot = Snapshot {
            version: 1,
            positions: self.positions.clone(),
            folded: store.folded,
            keys: store
                .keys()
                .iter()
                .map(|k| k.clone().map(|v| v.to_string()))
                .collect(),
            rows,
            engaged: store.engaged_all().collect(),
        };
        let bytes = serde_json::to_vec(&snapshot).map_err(std::io::Error::other)?;
        gannet_spool::durable::write_file(&self.dir.join("snapshot.json"), &bytes, 0o644)?;
        let journal = self.dir.join("journal");
        gannet_spool::durable::write_file(&journal, b"", 0o644)?;
        self.journal = std::fs::OpenOptions::new().append(true).open(&journal)?;
        self.snapshot_bytes = bytes.len() as u64;
        self.journal_bytes = 0;
        self.unsynced = false;
        tracing::info!(
            bytes = bytes.len(),
            rows = snapshot.rows.len(),
            ms = started.elapsed().as_millis() as u64,
            "metrics snapshot written"
        );
        Ok(())
    }
}

/// The event's own object inside `{"msys":{"<class>":{…}}}` (as
/// `sparkpost::Events` writes it: no spaces, the class a plain name).
fn inner(object: &[u8]) -> Option<&[u8]> {
    let rest = object.strip_prefix(b"{\"msys\":{\"")?;
    let start = rest.iter().position(|b| *b == b'{')?;
    rest.get(start..)?.strip_suffix(b"}}")
}

/// A converted event, as far as the tally reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Fields<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    message_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    tenant: Option<Cow<'a, str>>,
    #[serde(borrow)]
    rcpt_to: Option<Cow<'a, str>>,
    #[serde(borrow)]
    routing_domain: Option<Cow<'a, str>>,
    #[serde(borrow)]
    campaign_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    template_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    sending_ip: Option<Cow<'a, str>>,
    #[serde(borrow)]
    ip_pool: Option<Cow<'a, str>>,
    #[serde(borrow)]
    msg_from: Option<Cow<'a, str>>,
    #[serde(borrow)]
    friendly_from: Option<Cow<'a, str>>,
    #[serde(borrow)]
    num_retries: Option<Num<'a>>,
    #[serde(borrow)]
    queue_time: Option<Num<'a>>,
    #[serde(borrow)]
    msg_size: Option<Num<'a>>,
    #[serde(borrow)]
    bounce_class: Option<Num<'a>>,
}

/// A number as SparkPost writes it (a string) or as JSON does.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Num<'a> {
    Number(u64),
    #[serde(borrow)]
    Text(Cow<'a, str>),
}

impl Num<'_> {
    fn get(&self) -> Option<u64> {
        match self {
            Num::Number(n) => Some(*n),
            Num::Text(t) => t.trim().parse().ok(),
        }
    }
}

fn num(n: &Option<Num<'_>>) -> u64 {
    n.as_ref().and_then(Num::get).unwrap_or(0)
}

/// The domain of an address, lower case (borrowed when it is already).
fn domain_of(address: &str) -> Cow<'_, str> {
    let domain = address
        .rsplit_once('@')
        .map_or("", |(_, d)| d.trim_end_matches('>'));
    if domain.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(domain.to_ascii_lowercase())
    } else {
        Cow::Borrowed(domain)
    }
}

/// The counters one event adds and the key it adds them to; None for an event the
/// tally does not count. `engage(hash, flags)` records a message's engagement and
/// says what was known of it before.
fn tally<'f>(
    f: &'f Fields<'_>,
    counts: &mut Counts,
    mut engage: impl FnMut(u64, u8) -> u8,
) -> Option<[Cow<'f, str>; DIMS]> {
    let mut add = |c: Counter, n: u64| counts[c as usize] += n;
    let first = num(&f.num_retries) == 0;
    let bounce = |add: &mut dyn FnMut(Counter, u64), class: u64| {
        let c = match category(u16::try_from(class).unwrap_or(1)) {
            Category::Hard => Counter::HardBounce,
            Category::Soft => Counter::SoftBounce,
            Category::Block => Counter::BlockBounce,
            Category::Admin => Counter::AdminBounce,
            Category::Undetermined => Counter::UndeterminedBounce,
        };
        add(c, 1);
    };
    match f.kind.as_ref() {
        "injection" => add(Counter::Injected, 1),
        "policy_rejection" => add(Counter::PolicyRejection, 1),
        "generation_failure" => add(Counter::GenerationFailed, 1),
        "generation_rejection" => add(Counter::GenerationRejection, 1),
        "delivery" => {
            add(Counter::Delivered, 1);
            add(Counter::MsgVolume, num(&f.msg_size));
            if first {
                add(Counter::DeliveredFirst, 1);
                add(Counter::TimeFirst, num(&f.queue_time));
            } else {
                add(Counter::DeliveredSubsequent, 1);
                add(Counter::TimeSubsequent, num(&f.queue_time));
            }
        }
        "delay" => {
            add(Counter::Delayed, 1);
            if first {
                add(Counter::DelayedFirst, 1);
            }
        }
        "bounce" => {
            add(Counter::InbandBounce, 1);
            bounce(&mut add, num(&f.bounce_class));
        }
        "out_of_band" => {
            add(Counter::OutofbandBounce, 1);
            bounce(&mut add, num(&f.bounce_class));
        }
        "spam_complaint" => add(Counter::SpamComplaint, 1),
        "list_unsubscribe" | "link_unsubscribe" => add(Counter::Unsubscribe, 1),
        "open" | "click" => {
            let click = f.kind == "click";
            let (c, unique, flag) = if click {
                (Counter::Clicked, Counter::UniqueClicked, CLICKED)
            } else {
                (Counter::Rendered, Counter::UniqueRendered, OPENED)
            };
            add(c, 1);
            if let Some(id) = f.message_id.as_deref() {
                let known = engage(store::message_hash(id), flag);
                if known & flag == 0 {
                    add(unique, 1);
                }
                if known == 0 {
                    add(Counter::UniqueConfirmedOpened, 1);
                }
            }
        }
        _ => return None,
    }
    let text = |v: &'f Option<Cow<'_, str>>| Cow::Borrowed(v.as_deref().unwrap_or(""));
    let domain = match (&f.routing_domain, &f.rcpt_to) {
        (Some(d), _) if !d.bytes().any(|b| b.is_ascii_uppercase()) => Cow::Borrowed(d.as_ref()),
        (Some(d), _) => Cow::Owned(d.to_ascii_lowercase()),
        (None, Some(rcpt)) => domain_of(rcpt),
        (None, None) => Cow::Borrowed(""),
    };
    let sender = f.msg_from.as_deref().or(f.friendly_from.as_deref());
    let mut key: [Cow<'f, str>; DIMS] = Default::default();
    key[Dim::Tenant as usize] = text(&f.tenant);
    key[Dim::Domain as usize] = domain;
    key[Dim::Campaign as usize] = text(&f.campaign_id);
    key[Dim::Template as usize] = text(&f.template_id);
    key[Dim::SendingIp as usize] = text(&f.sending_ip);
    key[Dim::IpPool as usize] = text(&f.ip_pool);
    key[Dim::SendingDomain as usize] = sender.map_or(Cow::Borrowed(""), domain_of);
    Some(key)
}

/// The hose's sink that feeds the tally.
#[derive(Debug)]
pub struct TallySink {
    pub tally: Arc<Tally>,
}

impl Sink for TallySink {
    fn filter(&self) -> Option<Filter> {
        Some(Filter {
            types: TypeSet::of(TYPES).unwrap_or_default(),
            tenant: None,
        })
    }

    fn send(&mut self, batch: &BatchRef<'_>, events: &Events) -> Result<String, String> {
        self.tally
            .add_batch(batch.log, batch.end, events)
            .map(|()| "tallied".to_string())
            .map_err(|e| format!("writing the metrics journal: {e}"))
    }

    fn positions(&self) -> Option<Vec<u64>> {
        Some(self.tally.positions())
    }

    /// The Metrics API counts every event, whatever the webhooks are sent.
    fn asks_the_script(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests;
