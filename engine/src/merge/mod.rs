//! Mail merge, with no runtime and no I/O but the template store's files: SparkPost's
//! template language ([`template`]), content compiled once per transmission and
//! generated per recipient ([`content`]), the transmission request ([`transmission`]),
//! stored templates and recipient lists ([`store`]), engagement tracking tokens and
//! links ([`tracking`]), and the [`Job`] a transmission becomes. Running jobs — spooling,
//! spreading their chunks over the shards, resuming them — is `jobs`' part.

pub mod content;
pub mod store;
pub mod template;
pub mod tracking;
pub mod transmission;

use std::sync::Arc;

use gannet_spool::MessageId;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use content::Content;
use transmission::{RecipientSpec, Spec};

/// The `kind` meta value of a job record in the spool.
pub const JOB_KIND: &str = "transmission";

/// What a job record's body holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stored {
    /// The transmission this job is (part of): a large one is spooled as several
    /// jobs of at most `http.job_recipients_max` recipients, so that no record grows
    /// past what a spool segment holds and a resumed job re-reads a bounded record.
    #[serde(default)]
    pub transmission_id: String,
    pub spec: Spec,
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,
    pub due_ms: u64,
    pub received_ms: u64,
}

impl Stored {
    /// Everything but the request itself (for the jobs of one transmission).
    pub fn clone_without_spec(&self) -> Stored {
        Stored {
            transmission_id: self.transmission_id.clone(),
            spec: Spec::default(),
            pool: self.pool.clone(),
            tenant: self.tenant.clone(),
            template_id: self.template_id.clone(),
            due_ms: self.due_ms,
            received_ms: self.received_ms,
        }
    }
}

/// A transmission ready to generate: its recipients inline and its content compiled.
#[derive(Debug)]
pub struct Job {
    /// The transmission id (what events and the API reply say).
    pub id: String,
    pub stored: Stored,
    /// Shared by the jobs of one transmission.
    pub content: Arc<Content>,
    pub sandbox: bool,
}

impl Job {
    pub fn recipients(&self) -> &[RecipientSpec] {
        match &self.stored.spec.recipients {
            Some(transmission::Recipients::Inline(list)) => list,
            _ => &[],
        }
    }

    /// The campaign id, if the transmission names one.
    pub fn campaign(&self) -> Option<&str> {
        self.stored
            .spec
            .campaign_id
            .as_deref()
            .filter(|c| !c.is_empty())
    }
}

/// The recipient's metadata over the transmission's (what events report as rcpt_meta).
pub fn rcpt_meta(
    transmission: &Map<String, Value>,
    recipient: &Map<String, Value>,
) -> Map<String, Value> {
    let mut merged = transmission.clone();
    for (k, v) in recipient {
        merged.insert(k.clone(), v.clone());
    }
    merged
}

/// Rebuilds a job from its spool record (at start-up).
pub fn recover(id: MessageId, body: &[u8]) -> Result<Job, String> {
    let stored: Stored = serde_json::from_slice(body).map_err(|e| format!("job record: {e}"))?;
    let substitute = stored.spec.options.perform_substitutions.unwrap_or(true);
    let mut content = stored
        .spec
        .content
        .as_ref()
        .ok_or("job record without content")?
        .compile(substitute)
        .map_err(|r| r.description)?;
    content.inline_css = stored.spec.options.inline_css.unwrap_or(false);
    Ok(Job {
        id: if stored.transmission_id.is_empty() {
            id.to_string()
        } else {
            stored.transmission_id.clone()
        },
        sandbox: false,
        stored,
        content: Arc::new(content),
    })
}
