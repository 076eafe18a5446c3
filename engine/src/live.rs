//! Settings that change while gannetd runs: the traffic shaping and the DKIM keys
//! (reloaded from the configuration file on SIGHUP), and the operator's verbs of the
//! admin HTTP API — suspensions of scheduled and ready queues, bounces, requests to
//! retry scheduled queues now. They are kept behind one mutex with a generation
//! number; a shard reads the number (one atomic load per maintainer round) and takes
//! the lock only when it changed, so the delivery path never waits on it.
//!
//! The suspensions, bounces and rebinds survive a restart: [`Live::save`] writes them to
//! `<data_dir>/admin.json` (atomically and durably, `gannet_spool::durable`) before
//! the admin API answers, and [`Live::load_admin`] reads them back at start-up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::policy::script::{Script, ScriptSource};
use gannet_core::queue::admin::{AdminBounce, ReadySuspension, Rebind};
use gannet_core::shaping::{QueueSelector, ShapingTable, Suspension};

#[derive(Debug)]
pub struct Live {
    generation: AtomicU64,
    state: Mutex<Arc<LiveState>>,
    /// Where the operator's suspensions and bounces are kept (None: not kept, in
    /// unit tests), and the lock that puts one write at a time.
    file: Option<PathBuf>,
    writing: Mutex<()>,
}

/// One version of the live settings.
#[derive(Debug, Clone)]
pub struct LiveState {
    pub shaping: Arc<ShapingTable>,
    pub suspensions: Vec<Suspension>,
    /// The latest requests to retry scheduled queues now, oldest first, at most
    /// [`RETRIES_KEPT`]: each shard applies those newer than the last it applied.
    pub retries: Vec<RetryRequest>,
    pub dkim: Arc<crate::dkim::Signers>,
    /// The operator's suspensions of ready queues.
    pub ready_suspensions: Vec<ReadySuspension>,
    /// The operator's bounces in force, each with what it has bounced.
    pub bounces: Vec<LiveBounce>,
    /// Tenants' and campaigns' mail held back from a provider by response rules
    /// (suspend_tenant, suspend_campaign); not kept across a restart, as the rules
    /// in force are not.
    pub holds: Vec<gannet_core::adaptive::Hold>,
    /// Response rules that fired on other nodes of the cluster (`admin::cluster`),
    /// in force on this node's queues of the same names.
    pub cluster_rules: Vec<gannet_core::queue::adapt::SharedRule>,
    /// Adaptive backoffs that lowered ready queues on other nodes of the cluster,
    /// imposed on this node's queues of the same names.
    pub cluster_backoffs: Vec<gannet_core::queue::adapt::SharedBackoff>,
    /// The operator's rebinds, kept until no message they apply to can remain.
    pub rebinds: Vec<Rebind>,
    /// The policy script's source (checked to load before it is put here); each
    /// shard compiles its own VM from it when it changes.
    pub script: Option<Arc<crate::policy::script::ScriptSource>>,
}

/// Merges `new` holds into `holds` (a hold on the same mail and sites is extended,
/// never shortened; expired ones go); answers each of `new` as now in force.
pub fn merge_holds(
    holds: &mut Vec<gannet_core::adaptive::Hold>,
    new: &[gannet_core::adaptive::Hold],
    now: u64,
) -> Vec<gannet_core::adaptive::Hold> {
    holds.retain(|h| h.until_ms > now);
    let mut merged = Vec::with_capacity(new.len());
    for hold in new.iter().filter(|h| h.until_ms > now) {
        let index = match holds.iter().position(|h| h.same(hold)) {
            Some(i) => {
                holds[i].until_ms = holds[i].until_ms.max(hold.until_ms);
                i
            }
            None => {
                holds.push(hold.clone());
                holds.len() - 1
            }
        };
        merged.push(holds[index].clone());
    }
    merged
}

/// Whether merging `new` into `holds` would change them (a new hold, or a later
/// end).
pub fn holds_extended(
    holds: &[gannet_core::adaptive::Hold],
    new: &[gannet_core::adaptive::Hold],
    now: u64,
) -> bool {
    (new.iter().filter(|h| h.until_ms > now))
        .any(|n| !holds.iter().any(|h| h.same(n) && h.until_ms >= n.until_ms))
}

/// An operator's bounce and its tally.
#[derive(Debug, Clone)]
pub struct LiveBounce {
    pub bounce: AdminBounce,
    /// Parts bounced by scheduled queue, added to by every shard (an operator's verb
    /// at work, never the delivery path of a message not bounced). Counted since
    /// gannetd started: the tally is not kept across a restart.
    pub bounced: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl LiveBounce {
    pub fn new(bounce: AdminBounce) -> LiveBounce {
        LiveBounce {
            bounce,
            bounced: Arc::default(),
        }
    }

    pub fn tally(&self, queue: String, parts: usize) {
        *lock(&self.bounced).entry(queue).or_default() += parts;
    }

    pub fn counts(&self) -> BTreeMap<String, usize> {
        lock(&self.bounced).clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `admin.json`: what the operator's verbs set that must outlive the process.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    #[serde(default)]
    suspensions: Vec<Suspension>,
    #[serde(default)]
    ready_suspensions: Vec<ReadySuspension>,
    #[serde(default)]
    bounces: Vec<AdminBounce>,
    #[serde(default)]
    rebinds: Vec<Rebind>,
}

/// The file the operator's suspensions and bounces are kept in.
pub fn admin_file(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.json")
}

/// Retry requests kept in the live settings: more than any shard can miss between
/// two of its maintainer rounds.
pub const RETRIES_KEPT: usize = 64;

/// An operator's request to retry the selected scheduled queues now.
#[derive(Debug, Clone)]
pub struct RetryRequest {
    /// Numbers requests in order (from 1).
    pub seq: u64,
    pub queues: QueueSelector,
    pub reason: String,
}

impl Live {
    pub fn new(shaping: ShapingTable, dkim: crate::dkim::Signers) -> Live {
        Live {
            generation: AtomicU64::new(0),
            state: Mutex::new(Arc::new(LiveState {
                shaping: Arc::new(shaping),
                suspensions: Vec::new(),
                retries: Vec::new(),
                dkim: Arc::new(dkim),
                ready_suspensions: Vec::new(),
                bounces: Vec::new(),
                holds: Vec::new(),
                cluster_rules: Vec::new(),
                cluster_backoffs: Vec::new(),
                rebinds: Vec::new(),
                script: None,
            })),
            file: None,
            writing: Mutex::new(()),
        }
    }

    /// Keeps the operator's suspensions and bounces in `file`, starting with those
    /// it holds (expired ones left out). A file that cannot be read or parsed is an
    /// error naming it, its line and column: starting without the suspensions an
    /// operator set could send mail they held back.
    /// The live settings with the policy script's source (before any shard reads
    /// them).
    pub fn with_script(self, script: Option<Arc<crate::policy::script::ScriptSource>>) -> Live {
        let mut state = lock(&self.state);
        Arc::make_mut(&mut state).script = script;
        drop(state);
        self
    }

    pub fn load_admin(mut self, file: PathBuf, now_ms: u64) -> Result<Live, String> {
        let found = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice::<AdminFile>(&bytes).map_err(|err| {
                format!(
                    "{}:{}:{}: {err} (the admin API's suspensions and bounces; fix or remove the file)",
                    file.display(),
                    err.line(),
                    err.column()
                )
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => AdminFile::default(),
            Err(err) => return Err(format!("{}: {err}", file.display())),
        };
        self.update(|state| {
            state.suspensions = (found.suspensions.into_iter())
                .filter(|s| s.expires_unix_ms > now_ms)
                .collect();
            state.ready_suspensions = (found.ready_suspensions.into_iter())
                .filter(|s| s.expires_unix_ms > now_ms)
                .collect();
            state.bounces = (found.bounces.into_iter())
                .filter(|b| b.expires_unix_ms > now_ms)
                .map(LiveBounce::new)
                .collect();
            state.rebinds = (found.rebinds.into_iter())
                .filter(|r| r.expires_unix_ms > now_ms)
                .collect();
        });
        self.file = Some(file);
        Ok(self)
    }

    /// Writes the operator's suspensions and bounces as they are now (after the
    /// change being answered, and after any other change made meanwhile: one write
    /// at a time, each of the newest state). Blocks on a disk sync: run it off the
    /// executor.
    pub fn save(&self) -> std::io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let _one_at_a_time = lock(&self.writing);
        let state = self.snapshot();
        let now = gannet_core::clock::unix_ms();
        let kept = AdminFile {
            suspensions: (state.suspensions.iter())
                .filter(|s| s.expires_unix_ms > now)
                .cloned()
                .collect(),
            ready_suspensions: (state.ready_suspensions.iter())
                .filter(|s| s.expires_unix_ms > now)
                .cloned()
                .collect(),
            bounces: (state.bounces.iter())
                .filter(|b| b.bounce.expires_unix_ms > now)
                .map(|b| b.bounce.clone())
                .collect(),
            rebinds: (state.rebinds.iter())
                .filter(|r| r.expires_unix_ms > now)
                .cloned()
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&kept).map_err(std::io::Error::other)?;
        gannet_spool::durable::write_file(file, &bytes, 0o644)
    }

    /// Changes with every update.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> Arc<LiveState> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Applies `change` to a copy of the settings and publishes it.
    pub fn update<R>(&self, change: impl FnOnce(&mut LiveState) -> R) -> R {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = LiveState::clone(&guard);
        let result = change(&mut next);
        *guard = Arc::new(next);
        self.generation.fetch_add(1, Ordering::AcqRel);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_merge_by_their_mail_and_sites_and_only_grow() {
        use gannet_core::adaptive::{Hold, HoldSites, Whose};
        let hold = |who: &str, until_ms| Hold {
            whose: Whose::Tenant(who.into()),
            sites: HoldSites::Site("mx.site.test".into()),
            until_ms,
            rule: "r".into(),
        };
        let mut holds = vec![hold("acme", 100), hold("gone", 5)];
        assert!(!holds_extended(&holds, &[hold("acme", 90)], 10));
        assert!(holds_extended(&holds, &[hold("acme", 200)], 10));
        assert!(holds_extended(&holds, &[hold("bob", 50)], 10));
        assert!(!holds_extended(&holds, &[hold("bob", 9)], 10), "expired");
        let merged = merge_holds(&mut holds, &[hold("acme", 90), hold("bob", 50)], 10);
        assert_eq!(merged, [hold("acme", 100), hold("bob", 50)]);
        assert_eq!(holds, [hold("acme", 100), hold("bob", 50)], "gone expired");
        assert_eq!(hold("acme", 1).key(), "tenant acme|mx.site.test");
    }

    #[test]
    fn updates_are_published_with_a_new_generation() {
        let live = Live::new(
            ShapingTable::new(&Default::default()),
            crate::dkim::Signers::load(&Default::default()).unwrap(),
        );
        let before = live.snapshot();
        assert_eq!(live.generation(), 0);
        live.update(|s| {
            s.suspensions.push(Suspension {
                id: "a".into(),
                queues: Default::default(),
                reason: "r".into(),
                expires_unix_ms: 1,
            })
        });
        assert_eq!(live.generation(), 1);
        assert!(before.suspensions.is_empty(), "old snapshots are unchanged");
        assert_eq!(live.snapshot().suspensions.len(), 1);
    }
}

/// A VM of the policy script compiled from the live settings' source, and compiled
/// again when they carry another (SIGHUP): each shard holds one, and each sink of
/// the hose on its thread (a VM never leaves the thread that made it).
#[derive(Debug, Default)]
pub struct ScriptCache {
    generation: Option<u64>,
    source: Option<Arc<ScriptSource>>,
    vm: Option<Rc<Script>>,
}

impl ScriptCache {
    /// The VM of the current script (None: no script). The check is one atomic load
    /// when the live settings have not changed; `whose` names the holder in a log.
    pub fn get(&mut self, live: &Live, whose: impl FnOnce() -> String) -> Option<Rc<Script>> {
        let generation = live.generation();
        if self.generation != Some(generation) {
            self.generation = Some(generation);
            let source = live.snapshot().script.clone();
            let same = match (&source, &self.source) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                // Checked to load before it was published: failing here would be a
                // VM out of memory; the running VM stays then.
                match source.as_deref().map(ScriptSource::compile).transpose() {
                    Ok(vm) => self.vm = vm.map(Rc::new),
                    Err(err) => tracing::error!(
                        "{}: policy script not compiled (the running one stays): {err}",
                        whose()
                    ),
                }
                self.source = source;
            }
        }
        self.vm.clone()
    }
}
