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

#[derive(Debug, Default)]
struct State {
    templates: BTreeMap<String, Arc<StoredTemplate>>,
    lists: BTreeMap<String, Arc<StoredList>>,
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
    let id = id.trim_end_matches('-');
    id[..id.len().min(64)].to_string()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Store {
    /// Opens (creating) the directories and loads every item. A file that cannot be
    /// read or parsed is logged with its path and left out; the others load.
    pub fn open(data_dir: &Path) -> std::io::Result<Store> {
        let templates_dir = data_dir.join("templates");
        let lists_dir = data_dir.join("recipient-lists");
        std::fs::create_dir_all(&templates_dir)?;
        std::fs::create_dir_all(&lists_dir)?;
        let mut state = State::default();
        for (path, item) in load::<StoredTemplate>(&templates_dir)? {
            if path.file_stem().and_then(|s| s.to_str()) == Some(item.id.as_str()) {
                state.templates.insert(item.id.clone(), Arc::new(item));
            } else {
                tracing::error!(path = %path.display(), "template file does not hold the template its name says; left out");
            }
        }
        for (path, item) in load::<StoredList>(&lists_dir)? {
            if path.file_stem().and_then(|s| s.to_str()) == Some(item.id.as_str()) {
                state.lists.insert(item.id.clone(), Arc::new(item));
            } else {
                tracing::error!(path = %path.display(), "recipient list file does not hold the list its name says; left out");
            }
        }
        Ok(Store {
            templates_dir,
            lists_dir,
            state: Mutex::new(state),
            writing: Mutex::new(()),
        })
    }

    pub fn template(&self, id: &str) -> Option<Arc<StoredTemplate>> {
        lock(&self.state).templates.get(id).cloned()
    }

    pub fn templates(&self) -> Vec<Arc<StoredTemplate>> {
        lock(&self.state).templates.values().cloned().collect()
    }

    pub fn list(&self, id: &str) -> Option<Arc<StoredList>> {
        lock(&self.state).lists.get(id).cloned()
    }

    pub fn lists(&self) -> Vec<Arc<StoredList>> {
        lock(&self.state).lists.values().cloned().collect()
    }

    /// Applies `change` to the current version of a template (None: absent) and
    /// stores what it returns (None: delete). Blocking: call it on a blocking thread.
    pub fn change_template<E>(
        &self,
        id: &str,
        change: impl FnOnce(Option<&StoredTemplate>) -> Result<Option<StoredTemplate>, E>,
    ) -> Result<Result<(), E>, std::io::Error> {
        self.change(Kind::Template, id, |s| &mut s.templates, change)
    }

    /// Like [`Store::change_template`], for recipient lists.
    pub fn change_list<E>(
        &self,
        id: &str,
        change: impl FnOnce(Option<&StoredList>) -> Result<Option<StoredList>, E>,
    ) -> Result<Result<(), E>, std::io::Error> {
        self.change(Kind::List, id, |s| &mut s.lists, change)
    }

    /// One change at a time: read the current item, let `change` decide, write the
    /// file, then publish the new item in `map` of the state.
    fn change<T: Serialize, E>(
        &self,
        kind: Kind,
        id: &str,
        map: impl Fn(&mut State) -> &mut BTreeMap<String, Arc<T>>,
        change: impl FnOnce(Option<&T>) -> Result<Option<T>, E>,
    ) -> Result<Result<(), E>, std::io::Error> {
        let _writing = lock(&self.writing);
        let current = map(&mut lock(&self.state)).get(id).cloned();
        let next = match change(current.as_deref()) {
            Ok(next) => next,
            Err(e) => return Ok(Err(e)),
        };
        self.persist(kind, id, next.as_ref())?;
        let mut state = lock(&self.state);
        let items = map(&mut state);
        match next {
            Some(item) => items.insert(id.to_string(), Arc::new(item)),
            None => items.remove(id),
        };
        Ok(Ok(()))
    }

    fn persist<T: Serialize>(&self, kind: Kind, id: &str, item: Option<&T>) -> std::io::Result<()> {
        let dir = match kind {
            Kind::Template => &self.templates_dir,
            Kind::List => &self.lists_dir,
        };
        let path = dir.join(format!("{id}.json"));
        match item {
            Some(item) => {
                gannet_spool::durable::write_file(&path, &serde_json::to_vec(item)?, 0o644)
            }
            None => gannet_spool::durable::remove_file(&path),
        }
    }
}

fn load<T: for<'de> Deserialize<'de>>(dir: &Path) -> std::io::Result<Vec<(PathBuf, T)>> {
    let mut items = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue; // temporary files of an interrupted write
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
        store
            .change_list::<()>("l1", |_| Ok(Some(list.clone())))
            .unwrap()
            .unwrap();
        store
            .change_list::<()>("l2", |_| {
                Ok(Some(StoredList {
                    id: "l2".into(),
                    ..list.clone()
                }))
            })
            .unwrap()
            .unwrap();
        store
            .change_list::<()>("l2", |_| Ok(None))
            .unwrap()
            .unwrap();
        std::fs::write(dir.path().join("recipient-lists/broken.json"), b"{\"id\":").unwrap();
        std::fs::write(dir.path().join("recipient-lists/.l3.json.tmp"), b"partial").unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.lists().len(), 1);
        assert_eq!(reopened.list("l1").unwrap().name, "L");
        assert!(reopened.list("l2").is_none());
        // A refused change changes nothing.
        let refused = reopened.change_list("l1", |_| Err("no")).unwrap();
        assert_eq!(refused, Err("no"));
        assert!(reopened.list("l1").is_some());
    }
}
