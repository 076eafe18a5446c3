//! Stored templates and recipient lists, shared by every shard and durable in the
//! data directory: one JSON file per item under `<data_dir>/templates/` and
//! `<data_dir>/recipient-lists/`, written to a temporary file, fsynced, renamed over
//! the old one and the directory fsynced — so a crash leaves the old item or the new
//! one, never a torn file.
//!
//! Reads take the state lock only to clone an `Arc` (once per request, never per
//! message). Changes are serialised by a second lock held while the file is written;
//! they run on glommio's blocking-call thread, so no executor waits on a disk sync or
//! on another shard's change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::transmission::{ContentSpec, RecipientSpec};

/// One version (draft or published) of a stored template.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Version {
    pub content: ContentSpec,
    #[serde(default)]
    pub options: TemplateOptions,
    /// RFC 3339, UTC.
    pub last_update_time: String,
    pub updated_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TemplateOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_tracking: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub click_tracking: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transactional: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredTemplate {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<Version>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft: Option<Version>,
}

impl StoredTemplate {
    /// The newest version, draft or published.
    pub fn latest(&self) -> Option<&Version> {
        match (&self.draft, &self.published) {
            (Some(d), Some(p)) => Some(if d.updated_ms >= p.updated_ms { d } else { p }),
            (d, p) => d.as_ref().or(p.as_ref()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredList {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub attributes: Map<String, Value>,
    pub recipients: Vec<RecipientSpec>,
}

/// The tenant that owns stored items: the API key's tenant, or none.
pub type Tenant<'a> = Option<&'a str>;

/// An item's key in the state: (tenant or "", id). Configured tenant names are never
/// empty, so "" stands for "no tenant" without ambiguity.
type Key = (String, String);

fn key(tenant: Tenant<'_>, id: &str) -> Key {
    (tenant.unwrap_or("").to_string(), id.to_string())
}

#[derive(Debug, Default)]
struct State {
    templates: BTreeMap<Key, Arc<StoredTemplate>>,
    lists: BTreeMap<Key, Arc<StoredList>>,
}

/// The items of one tenant in a map, in id order.
fn of_tenant<'m, T>(
    map: &'m BTreeMap<Key, Arc<T>>,
    tenant: Tenant<'_>,
) -> impl Iterator<Item = &'m Arc<T>> + 'm {
    let tenant = tenant.unwrap_or("").to_string();
    map.range((tenant.clone(), String::new())..)
        .take_while(move |((t, _), _)| *t == tenant)
        .map(|(_, item)| item)
}

#[derive(Debug)]
pub struct Store {
    templates_dir: PathBuf,
    lists_dir: PathBuf,
    state: Mutex<State>,
    /// Held while a change is written; never taken on an executor thread.
    writing: Mutex<()>,
}

/// What kind of item a change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Template,
    List,
}

/// An item id is also a file name: ASCII letters, digits, `-`, `_` and `.`, not
/// starting with `.`, at most 64 bytes.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An id made from a name: lower case, runs of other characters as one `-`.
pub fn id_from_name(name: &str) -> String {
    let mut id = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            id.push(c.to_ascii_lowercase());
        } else if !id.ends_with('-') && !id.is_empty() {
            id.push('-');
        }
    }
    // ASCII only, so any byte offset is a character boundary.
    let id = id.trim_end_matches('-');
    id[..id.len().min(64)].to_string()
}

/// The directory of a tenant's items under a kind's directory: the directory itself
/// for no tenant (where items of keys without a tenant, and of versions before
/// tenants, live), `@<hex of the name>` for a tenant — `@` starts no valid id, and
/// hex keeps any tenant name a safe file name.
fn tenant_dir(base: &Path, tenant: Tenant<'_>) -> PathBuf {
    match tenant {
        None => base.to_path_buf(),
        Some(t) => {
            let mut name = String::with_capacity(1 + 2 * t.len());
            name.push('@');
            for b in t.bytes() {
                name.push_str(&format!("{b:02x}"));
            }
            base.join(name)
        }
    }
}

/// The tenant a `@<hex>` directory name stands for.
fn tenant_of_dir(name: &str) -> Option<String> {
    let hex = name.strip_prefix('@')?;
    if hex.is_empty() || hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Loads every item of a kind: the base directory (no tenant) and each tenant's.
fn load_all<T: for<'de> Deserialize<'de>>(
    base: &Path,
    id_of: impl Fn(&T) -> &str,
) -> std::io::Result<BTreeMap<Key, Arc<T>>> {
    let mut dirs = vec![(None, base.to_path_buf())];
    for entry in std::fs::read_dir(base)? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(tenant) = name.to_str().and_then(tenant_of_dir)
            && entry.file_type()?.is_dir()
        {
            dirs.push((Some(tenant), entry.path()));
        }
    }
    let mut items = BTreeMap::new();
    for (tenant, dir) in dirs {
        for (path, item) in load::<T>(&dir)? {
            if path.file_stem().and_then(|s| s.to_str()) == Some(id_of(&item)) {
                let k = key(tenant.as_deref(), id_of(&item));
                items.insert(k, Arc::new(item));
            } else {
                tracing::error!(path = %path.display(), "file does not hold the item its name says; left out");
            }
        }
    }
    Ok(items)
}

impl Store {
    /// Opens (creating) the directories and loads every item. A file that cannot be
    /// read or parsed is logged with its path and left out; the others load.
    pub fn open(data_dir: &Path) -> std::io::Result<Store> {
        let templates_dir = data_dir.join("templates");
        let lists_dir = data_dir.join("recipient-lists");
        std::fs::create_dir_all(&templates_dir)?;
        std::fs::create_dir_all(&lists_dir)?;
        let state = State {
            templates: load_all::<StoredTemplate>(&templates_dir, |t| &t.id)?,
            lists: load_all::<StoredList>(&lists_dir, |l| &l.id)?,
        };
        Ok(Store {
            templates_dir,
            lists_dir,
            state: Mutex::new(state),
            writing: Mutex::new(()),
        })
    }

    pub fn template(&self, tenant: Tenant<'_>, id: &str) -> Option<Arc<StoredTemplate>> {
        lock(&self.state).templates.get(&key(tenant, id)).cloned()
    }

    pub fn templates(&self, tenant: Tenant<'_>) -> Vec<Arc<StoredTemplate>> {
        of_tenant(&lock(&self.state).templates, tenant)
            .cloned()
            .collect()
    }

    pub fn list(&self, tenant: Tenant<'_>, id: &str) -> Option<Arc<StoredList>> {
        lock(&self.state).lists.get(&key(tenant, id)).cloned()
    }

    pub fn lists(&self, tenant: Tenant<'_>) -> Vec<Arc<StoredList>> {
        of_tenant(&lock(&self.state).lists, tenant)
            .cloned()
            .collect()
    }

    /// Applies `change` to the current version of a tenant's template (None: absent)
    /// and stores what it returns (None: delete). A new template past `max` of the
    /// tenant's is refused with `full()`. Blocking: call it on a blocking thread.
    pub fn change_template<E>(
        &self,
        tenant: Tenant<'_>,
        id: &str,
        max: usize,
        full: impl FnOnce() -> E,
        change: impl FnOnce(Option<&StoredTemplate>) -> Result<Option<StoredTemplate>, E>,
    ) -> Result<Result<(), E>, std::io::Error> {
        let at = Where {
            kind: Kind::Template,
            tenant,
            id,
            max,
        };
        self.change(at, |s| &mut s.templates, full, change)
    }

    /// Like [`Store::change_template`], for recipient lists.
    pub fn change_list<E>(
        &self,
        tenant: Tenant<'_>,
        id: &str,
        max: usize,
        full: impl FnOnce() -> E,
        change: impl FnOnce(Option<&StoredList>) -> Result<Option<StoredList>, E>,
    ) -> Result<Result<(), E>, std::io::Error> {
        let at = Where {
            kind: Kind::List,
            tenant,
            id,
            max,
        };
        self.change(at, |s| &mut s.lists, full, change)
    }

    /// One change at a time: read the current item, let `change` decide, write the
    /// file, then publish the new item in `map` of the state.
    fn change<T: Serialize, E>(
        &self,
        at: Where<'_>,
        map: impl Fn(&mut State) -> &mut BTreeMap<Key, Arc<T>>,
        full: impl FnOnce() -> E,
        change: impl FnOnce(Option<&T>) -> Result<Option<T>, E>,
    ) -> Result<Result<(), E>, std::io::Error> {
        let _writing = lock(&self.writing);
        let k = key(at.tenant, at.id);
        let (current, count) = {
            let mut state = lock(&self.state);
            let items = map(&mut state);
            (
                items.get(&k).cloned(),
                of_tenant(items, at.tenant).take(at.max).count(),
            )
        };
        let next = match change(current.as_deref()) {
            Ok(next) => next,
            Err(e) => return Ok(Err(e)),
        };
        if current.is_none() && next.is_some() && count >= at.max {
            return Ok(Err(full()));
        }
        self.persist(&at, next.as_ref())?;
        let mut state = lock(&self.state);
        let items = map(&mut state);
        match next {
            Some(item) => items.insert(k, Arc::new(item)),
            None => items.remove(&k),
        };
        Ok(Ok(()))
    }

    fn persist<T: Serialize>(&self, at: &Where<'_>, item: Option<&T>) -> std::io::Result<()> {
        let base = match at.kind {
            Kind::Template => &self.templates_dir,
            Kind::List => &self.lists_dir,
        };
        let dir = tenant_dir(base, at.tenant);
        let path = dir.join(format!("{}.json", at.id));
        match item {
            Some(item) => {
                if at.tenant.is_some() && !dir.exists() {
                    std::fs::create_dir(&dir)?;
                    gannet_spool::durable::sync_dir(base)?;
                }
                gannet_spool::durable::write_file(&path, &serde_json::to_vec(item)?, 0o644)
            }
            None => gannet_spool::durable::remove_file(&path),
        }
    }
}

/// Which item a change is about, and the tenant's bound for that kind.
struct Where<'a> {
    kind: Kind,
    tenant: Tenant<'a>,
    id: &'a str,
    max: usize,
}

fn load<T: for<'de> Deserialize<'de>>(dir: &Path) -> std::io::Result<Vec<(PathBuf, T)>> {
    let mut items = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") || !path.is_file() {
            continue; // temporary files of an interrupted write, tenant directories
        }
        let parsed = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice::<T>(&bytes).map_err(|e| e.to_string()));
        match parsed {
            Ok(item) => items.push((path, item)),
            Err(err) => tracing::error!(path = %path.display(), "cannot load {err}; left out"),
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("welcome-email_v2.1"));
        assert!(!valid_id(""));
        assert!(!valid_id(".hidden"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"a".repeat(65)));
        assert_eq!(id_from_name("Summer Sale: 20% off!"), "summer-sale-20-off");
        assert_eq!(id_from_name("  Welcome  "), "welcome");
    }

    #[test]
    fn changes_survive_reopening_and_bad_files_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let list = StoredList {
            id: "l1".into(),
            name: "L".into(),
            description: None,
            attributes: Map::new(),
            recipients: Vec::new(),
        };
        let full = || "full";
        store
            .change_list(None, "l1", 10, full, |_| Ok(Some(list.clone())))
            .unwrap()
            .unwrap();
        store
            .change_list(None, "l2", 10, full, |_| {
                Ok(Some(StoredList {
                    id: "l2".into(),
                    ..list.clone()
                }))
            })
            .unwrap()
            .unwrap();
        store
            .change_list(None, "l2", 10, full, |_| Ok(None))
            .unwrap()
            .unwrap();
        std::fs::write(dir.path().join("recipient-lists/broken.json"), b"{\"id\":").unwrap();
        std::fs::write(dir.path().join("recipient-lists/.l3.json.tmp"), b"partial").unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.lists(None).len(), 1);
        assert_eq!(reopened.list(None, "l1").unwrap().name, "L");
        assert!(reopened.list(None, "l2").is_none());
        // A refused change changes nothing.
        let refused = reopened
            .change_list(None, "l1", 10, full, |_| Err("no"))
            .unwrap();
        assert_eq!(refused, Err("no"));
        assert!(reopened.list(None, "l1").is_some());
    }

    #[test]
    fn tenants_see_only_their_own_items_and_are_bounded_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let list = |id: &str| StoredList {
            id: id.into(),
            name: id.into(),
            description: None,
            attributes: Map::new(),
            recipients: Vec::new(),
        };
        let full = || "full";
        for (tenant, id) in [
            (Some("acme"), "a"),
            (Some("acme"), "b"),
            (Some("ümlaut/..\\x"), "a"),
            (None, "a"),
        ] {
            store
                .change_list(tenant, id, 2, full, |_| Ok(Some(list(id))))
                .unwrap()
                .unwrap();
        }
        // acme has its 2; a third is refused; replacing one is not a new one.
        let third = store.change_list(Some("acme"), "c", 2, full, |_| Ok(Some(list("c"))));
        assert_eq!(third.unwrap(), Err("full"));
        let again = store.change_list(Some("acme"), "a", 2, full, |_| Ok(Some(list("a"))));
        assert_eq!(again.unwrap(), Ok(()));
        let reopened = Store::open(dir.path()).unwrap();
        let ids = |t| -> Vec<String> { reopened.lists(t).iter().map(|l| l.id.clone()).collect() };
        assert_eq!(ids(Some("acme")), ["a", "b"]);
        assert_eq!(ids(Some("ümlaut/..\\x")), ["a"]);
        assert_eq!(ids(None), ["a"]);
        assert!(ids(Some("other")).is_empty());
        assert!(reopened.list(Some("other"), "a").is_none());
        assert!(reopened.list(Some("acme"), "b").is_some());
        assert!(reopened.list(None, "b").is_none());
        assert_eq!(tenant_of_dir("@41"), Some("A".into()));
        for bad in ["@", "@4", "@zz", "41", "@c3"] {
            assert_eq!(tenant_of_dir(bad), None, "{bad}");
        }
    }
}
