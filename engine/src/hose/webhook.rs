//! Webhooks: SparkPost's definitions (name, target, events, auth, custom headers),
//! kept in `<data_dir>/webhooks.json`, and the HTTP client that POSTs a batch.
//!
//! The file is replaced whole and durably on every change (temporary file, fsync,
//! rename, fsync of the directory); a damaged file stops the start with its line and
//! column. Posts run on the webhook's own sink thread with a blocking client (ureq,
//! rustls for https): the shards never wait on a receiver.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One webhook, as stored and as the API shows it (credentials aside).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Webhook {
    pub id: String,
    pub name: String,
    pub target: String,
    pub events: Vec<String>,
    /// "none", "basic" or "oauth2".
    pub auth_type: String,
    /// basic: `{"username", "password"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_credentials: Option<Value>,
    /// oauth2: `{"url", "body": {"client_id", "client_secret"}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_request_details: Option<Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom_headers: BTreeMap<String, String>,
    #[serde(default = "yes")]
    pub active: bool,
    /// The tenant whose key made it: it gets that tenant's events only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub created_ms: u64,
}

fn yes() -> bool {
    true
}

/// The stored webhooks, shared by every shard's API handler and the hose.
#[derive(Debug)]
pub struct Webhooks {
    path: PathBuf,
    state: Mutex<BTreeMap<String, Arc<Webhook>>>,
    /// Held while a change is written, so changes are applied in order.
    change: Mutex<()>,
}

impl Webhooks {
    /// Loads `<data_dir>/webhooks.json` (none yet: no webhooks).
    pub fn open(data_dir: &Path) -> anyhow::Result<Webhooks> {
        let path = data_dir.join("webhooks.json");
        let mut state = BTreeMap::new();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let hooks: Vec<Webhook> = serde_json::from_slice(&bytes).map_err(|e| {
                    anyhow::anyhow!("{}:{}:{}: {e}", path.display(), e.line(), e.column())
                })?;
                for hook in hooks {
                    state.insert(hook.id.clone(), Arc::new(hook));
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => anyhow::bail!("{}: {err}", path.display()),
        }
        Ok(Webhooks {
            path,
            state: Mutex::new(state),
            change: Mutex::new(()),
        })
    }

    pub fn get(&self, id: &str) -> Option<Arc<Webhook>> {
        self.lock().get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Webhook>> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Webhook>>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `change` to the webhooks and writes the file (blocking: run it on the
    /// blocking thread); the state changes only once the file is durable.
    pub fn change<R>(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, Arc<Webhook>>) -> R,
    ) -> std::io::Result<R> {
        let _serial = self.change.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = self.lock().clone();
        let result = change(&mut next);
        let list: Vec<&Webhook> = next.values().map(|h| &**h).collect();
        let bytes = serde_json::to_vec_pretty(&list).map_err(std::io::Error::other)?;
        gannet_spool::durable::write_file(&self.path, &bytes, 0o600)?;
        *self.lock() = next;
        Ok(result)
    }
}

/// What a receiver answered to one POST.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The HTTP status; 0 when there was no answer (connection, TLS, timeout).
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Why there was no answer.
    pub error: Option<String>,
}

impl Answer {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// `200`, or the error for a failed connection.
    pub fn describe(&self) -> String {
        match &self.error {
            Some(err) => err.clone(),
            None => self.status.to_string(),
        }
    }
}

/// POSTs to one webhook's target, with its auth and headers; keeps an OAuth2
/// access token until shortly before it expires.
#[derive(Debug)]
pub struct Poster {
    agent: ureq::Agent,
    token: Mutex<Option<(String, Instant)>>,
}

/// Largest receiver answer kept (for batch-status and validate).
const ANSWER_BYTES_MAX: u64 = 4096;

impl Poster {
    pub fn new(timeout: Duration) -> Poster {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .user_agent("gannet-webhooks/1")
            .build()
            .new_agent();
        Poster {
            agent,
            token: Mutex::new(None),
        }
    }

    /// POSTs `body` (a JSON array) to the webhook; `batch_id` goes in
    /// `X-MessageSystems-Batch-ID` as SparkPost's does.
    pub fn post(&self, hook: &Webhook, batch_id: &str, body: &[u8]) -> Answer {
        let mut answer = self.post_once(hook, batch_id, body);
        if answer.status == 401 && hook.auth_type == "oauth2" {
            // The token may have been revoked: get a new one, once.
            *self.token.lock().unwrap_or_else(PoisonError::into_inner) = None;
            answer = self.post_once(hook, batch_id, body);
        }
        answer
    }

    fn post_once(&self, hook: &Webhook, batch_id: &str, body: &[u8]) -> Answer {
        let mut request = self
            .agent
            .post(&hook.target)
            .header("Content-Type", "application/json")
            .header("X-MessageSystems-Webhook-Id", &hook.id)
            .header("X-MessageSystems-Batch-ID", batch_id);
        match self.authorization(hook) {
            Ok(Some(value)) => request = request.header("Authorization", &value),
            Ok(None) => {}
            Err(err) => return failed(format!("getting an OAuth2 token: {err}")),
        }
        for (name, value) in &hook.custom_headers {
            request = request.header(name, value);
        }
        match request.send(body) {
            Ok(response) => answer(response),
            Err(err) => failed(err.to_string()),
        }
    }

    /// The Authorization header's value for the webhook's auth type.
    fn authorization(&self, hook: &Webhook) -> Result<Option<String>, String> {
        use base64::Engine as _;
        match hook.auth_type.as_str() {
            "basic" => {
                let creds = hook.auth_credentials.as_ref();
                let field = |k: &str| creds.and_then(|c| c.get(k)).and_then(Value::as_str);
                let pair = format!(
                    "{}:{}",
                    field("username").unwrap_or(""),
                    field("password").unwrap_or("")
                );
                Ok(Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                )))
            }
            "oauth2" => {
                let mut token = self.token.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some((value, until)) = &*token
                    && Instant::now() < *until
                {
                    return Ok(Some(format!("Bearer {value}")));
                }
                let (value, lifetime) = self.fetch_token(hook)?;
                // Renewed a little before it runs out.
                let until = Instant::now() + lifetime.saturating_sub(Duration::from_secs(30));
                *token = Some((value.clone(), until));
                Ok(Some(format!("Bearer {value}")))
            }
            _ => Ok(None),
        }
    }

    /// OAuth2 client credentials grant (RFC 6749 4.4) at the webhook's token URL.
    fn fetch_token(&self, hook: &Webhook) -> Result<(String, Duration), String> {
        let details = hook
            .auth_request_details
            .as_ref()
            .ok_or("no auth_request_details")?;
        let url = details.get("url").and_then(Value::as_str).ok_or("no url")?;
        let body = details.get("body");
        let field = |k: &str| {
            body.and_then(|b| b.get(k))
                .and_then(Value::as_str)
                .unwrap_or("")
        };
        let response = self
            .agent
            .post(url)
            .send_form([
                ("grant_type", "client_credentials"),
                ("client_id", field("client_id")),
                ("client_secret", field("client_secret")),
            ])
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let text = response
            .into_body()
            .with_config()
            .limit(64 << 10)
            .read_to_string()
            .map_err(|e| e.to_string())?;
        if !(200..300).contains(&status) {
            return Err(format!("token URL answered {status}: {text}"));
        }
        let json: Value = serde_json::from_str(&text).map_err(|e| format!("token answer: {e}"))?;
        let token = json
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or("no access_token in the token answer")?;
        let lifetime = json
            .get("expires_in")
            .and_then(Value::as_u64)
            .unwrap_or(3600);
        Ok((token.to_string(), Duration::from_secs(lifetime)))
    }
}

fn failed(error: String) -> Answer {
    Answer {
        status: 0,
        headers: Vec::new(),
        body: String::new(),
        error: Some(error),
    }
}

fn answer(response: ureq::http::Response<ureq::Body>) -> Answer {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body = String::new();
    let mut reader = response.into_body().into_reader();
    let _ = std::io::Read::read_to_string(
        &mut std::io::Read::take(&mut reader, ANSWER_BYTES_MAX),
        &mut body,
    );
    Answer {
        status,
        headers,
        body,
        error: None,
    }
}
