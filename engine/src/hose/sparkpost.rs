//! gannet's events in SparkPost's webhook format: each event line of a shard's log
//! becomes one or more `{"msys": {"<class>": {...}}}` objects with SparkPost's field
//! names and types (numbers as strings, timestamps as unix seconds in a string).
//!
//! A reception (an SMTP message) becomes one `injection` per recipient; transient
//! failures and deferrals without an attempt are `delay`; bounces, expirations and an
//! operator's bounces are `bounce` (bounce classes 24 and 25 for the last two). gannet's
//! own events with no SparkPost counterpart (`adaptive`, `admin_rebind`, `cluster`) go out in a
//! `gannet_event` object, to sinks that ask for them by name.

use std::borrow::Cow;

use gannet_core::clock::rfc3339_millis as rfc3339;

use serde_json::Value;
use serde_json::value::RawValue;

pub use gannet_core::event_types::{TYPES, TypeSet, default_types};

/// Which events a sink ships.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub types: TypeSet,
    /// Only this tenant's events (a webhook made with a tenant's key).
    pub tenant: Option<String>,
}

/// The SparkPost type of a gannet event type, and whether it is one at all.
fn sparkpost_type(gannet: &str) -> Option<&'static str> {
    Some(match gannet {
        "reception" | "injection" => "injection",
        "delivery" => "delivery",
        "transient_failure" | "delayed" => "delay",
        "bounce" | "expiration" | "admin_bounce" => "bounce",
        "policy_rejection" => "policy_rejection",
        "out_of_band" => "out_of_band",
        "spam_complaint" => "spam_complaint",
        "generation_failure" => "generation_failure",
        "open" => "open",
        "click" => "click",
        "list_unsubscribe" => "list_unsubscribe",
        "adaptive" => "adaptive",
        "admin_rebind" => "admin_rebind",
        "cluster" => "cluster",
        _ => return None,
    })
}

/// Converted events: their `{"msys": …}` objects written one after the other into
/// `body` as a JSON array (what a webhook POSTs as it is), and where each one is.
#[derive(Debug, Default)]
pub struct Events {
    pub body: Vec<u8>,
    pub items: Vec<Item>,
}

/// One converted event: its SparkPost type, its bytes in [`Events::body`], its id.
#[derive(Debug)]
pub struct Item {
    pub kind: &'static str,
    pub start: usize,
    pub end: usize,
    pub timestamp_ms: u64,
    pub event_id: String,
}

impl Events {
    pub fn new() -> Events {
        Events {
            body: b"[".to_vec(),
            items: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Keeps the first `len` events only (those after are taken back).
    pub fn truncate(&mut self, len: usize) {
        self.items.truncate(len);
        self.body
            .truncate(self.items.last().map_or(1, |last| last.end));
    }

    /// The array, closed (`[` … `]`).
    pub fn array(&self) -> Vec<u8> {
        let mut array = Vec::with_capacity(self.body.len() + 1);
        array.extend_from_slice(&self.body);
        array.push(b']');
        array
    }

    /// One event's object.
    pub fn object(&self, item: &Item) -> &[u8] {
        &self.body[item.start..item.end]
    }

    /// Starts the object of an event: `{"msys":{"<class>":{"type":…,"event_id":…,
    /// "timestamp":…` — the caller adds fields and ends it with [`Events::end`].
    fn begin(
        &mut self,
        kind: &'static str,
        class: &str,
        event_id: String,
        timestamp_ms: u64,
    ) -> Fields<'_> {
        if !self.items.is_empty() {
            self.body.push(b',');
        }
        let start = self.body.len();
        self.body.extend_from_slice(b"{\"msys\":{\"");
        self.body.extend_from_slice(class.as_bytes());
        self.body.extend_from_slice(b"\":{\"type\":\"");
        self.body.extend_from_slice(kind.as_bytes());
        self.body.extend_from_slice(b"\",\"event_id\":\"");
        self.body.extend_from_slice(event_id.as_bytes());
        self.body.extend_from_slice(b"\",\"timestamp\":\"");
        self.body
            .extend_from_slice((timestamp_ms / 1000).to_string().as_bytes());
        self.body.push(b'"');
        self.items.push(Item {
            kind,
            start,
            end: start,
            timestamp_ms,
            event_id,
        });
        Fields {
            out: &mut self.body,
        }
    }

    fn end(&mut self) {
        self.body.extend_from_slice(b"}}}");
        if let Some(item) = self.items.last_mut() {
            item.end = self.body.len();
        }
    }
}

/// Writes `,"key":value` pairs into an event's object.
struct Fields<'o> {
    out: &'o mut Vec<u8>,
}

impl Fields<'_> {
    fn key(&mut self, key: &str) {
        self.out.extend_from_slice(b",\"");
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A string value, escaped.
    fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.out, value);
        self
    }

    fn opt(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        if let Some(value) = value {
            self.str(key, value);
        }
        self
    }

    /// A number, as SparkPost sends it: a string.
    fn num(&mut self, key: &str, value: Option<u64>) -> &mut Self {
        if let Some(value) = value {
            self.key(key);
            self.out.push(b'"');
            self.out.extend_from_slice(value.to_string().as_bytes());
            self.out.push(b'"');
        }
        self
    }

    /// JSON as it was in the log (metadata, tags).
    fn raw(&mut self, key: &str, value: Option<&RawValue>) -> &mut Self {
        if let Some(value) = value.filter(|v| v.get() != "null") {
            self.key(key);
            self.out.extend_from_slice(value.get().as_bytes());
        }
        self
    }

    /// rcpt_to (lower case), raw_rcpt_to and routing_domain of a recipient.
    fn recipient(&mut self, rcpt: &str) -> &mut Self {
        self.str("rcpt_to", &rcpt.to_ascii_lowercase());
        self.str("raw_rcpt_to", rcpt);
        if let Some((_, domain)) = rcpt.rsplit_once('@') {
            self.str("routing_domain", &domain.to_ascii_lowercase());
        }
        self
    }

    /// raw_reason, reason and error_code of a failure's reply.
    fn failure(&mut self, reply: &str) -> &mut Self {
        self.str("raw_reason", reply);
        self.str("reason", reply);
        let digits = reply.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 {
            self.str("error_code", &reply[..digits]);
        }
        self
    }
}

/// The fields of gannet's events that SparkPost's need, borrowed from the line.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct Line<'a> {
    timestamp_ms: u64,
    #[serde(borrow)]
    message_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    transmission_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    campaign_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    template_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    tenant: Option<Cow<'a, str>>,
    #[serde(borrow)]
    ip_pool: Option<Cow<'a, str>>,
    #[serde(borrow)]
    rcpt_meta: Option<&'a RawValue>,
    #[serde(borrow)]
    rcpt_tags: Option<&'a RawValue>,
    msg_size: Option<u64>,
    /// A string, or (a reception) an array of them.
    #[serde(borrow)]
    rcpt_to: Option<&'a RawValue>,
    #[serde(borrow)]
    sender: Option<Cow<'a, str>>,
    #[serde(borrow)]
    msg_from: Option<Cow<'a, str>>,
    #[serde(borrow)]
    subject: Option<Cow<'a, str>>,
    #[serde(borrow)]
    queue: Option<Cow<'a, str>>,
    sandbox: bool,
    #[serde(borrow)]
    sending_ip: Option<Cow<'a, str>>,
    #[serde(borrow)]
    peer: Option<Cow<'a, str>>,
    queue_time: Option<u64>,
    num_retries: Option<u64>,
    #[serde(borrow)]
    tls: Option<Cow<'a, str>>,
    #[serde(borrow)]
    egress_source: Option<Cow<'a, str>>,
    #[serde(borrow)]
    response: Option<Cow<'a, str>>,
    bounce_class: Option<u64>,
    #[serde(borrow)]
    reply: Option<Cow<'a, str>>,
    #[serde(borrow)]
    phase: Option<Cow<'a, str>>,
    #[serde(borrow)]
    reason: Option<Cow<'a, str>>,
    #[serde(borrow)]
    user_agent: Option<Cow<'a, str>>,
    #[serde(borrow)]
    ip_address: Option<Cow<'a, str>>,
    #[serde(borrow)]
    target_link_url: Option<Cow<'a, str>>,
}

/// Converts one log line (at position `lsn` of shard `shard`'s log) into the events
/// `filter` wants, appended to `out`. A line that is not an event gannet knows (a
/// newer version's, or damaged) is skipped: Err says why, for the log.
pub fn convert(
    line: &[u8],
    shard: u16,
    lsn: u64,
    filter: &Filter,
    out: &mut Events,
) -> Result<(), String> {
    // The type comes first in every line (serde's tag): most filtered-out events are
    // dropped without parsing the rest.
    let gannet_type = line
        .strip_prefix(b"{\"type\":\"")
        .and_then(|rest| rest.split(|b| *b == b'"').next())
        .and_then(|t| std::str::from_utf8(t).ok())
        .ok_or("no type")?;
    let Some(kind) = sparkpost_type(gannet_type) else {
        return Ok(());
    };
    if !filter.types.contains(kind) {
        return Ok(());
    }
    let class = TYPES
        .iter()
        .find(|t| t.0 == kind)
        .map_or("message_event", |t| t.1);
    // Unique and stable: the line's position, its shard and the index of the event
    // made from it (a reception makes one per recipient).
    let id = u128::from(lsn) << 16 | u128::from(shard);
    let event_id = |index: usize| format!("{id}{index:05}");
    if class == "gannet_event"
        || matches!(kind, "out_of_band" | "spam_complaint" | "list_unsubscribe")
    {
        return convert_as_is(line, kind, class, event_id(0), filter, out);
    }
    let e: Line<'_> = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    if filter.tenant.is_some() && filter.tenant.as_deref() != e.tenant.as_deref() {
        return Ok(());
    }
    let common = |f: &mut Fields<'_>, e: &Line<'_>| {
        f.opt("message_id", e.message_id.as_deref())
            .opt("transmission_id", e.transmission_id.as_deref())
            .opt("campaign_id", e.campaign_id.as_deref())
            .opt("template_id", e.template_id.as_deref())
            .raw("rcpt_meta", e.rcpt_meta)
            .raw("rcpt_tags", e.rcpt_tags)
            .opt("ip_pool", e.ip_pool.as_deref())
            .num("msg_size", e.msg_size)
            .opt("tenant", e.tenant.as_deref());
    };
    let rcpts: Vec<Cow<'_, str>> = match e.rcpt_to {
        None => Vec::new(),
        Some(raw) if raw.get().starts_with('[') => {
            serde_json::from_str(raw.get()).map_err(|e| e.to_string())?
        }
        Some(raw) => vec![serde_json::from_str(raw.get()).map_err(|e| e.to_string())?],
    };
    let rcpt = rcpts.first().map_or("", |r| r.as_ref());
    let sender = e.sender.as_deref().unwrap_or("");
    match gannet_type {
        "reception" => {
            let injection_time = rfc3339(e.timestamp_ms);
            for (index, rcpt) in rcpts.iter().enumerate() {
                let mut f = out.begin(kind, class, event_id(index), e.timestamp_ms);
                common(&mut f, &e);
                f.recipient(rcpt)
                    .str("msg_from", sender)
                    .str("friendly_from", sender)
                    .opt("subject", e.subject.as_deref())
                    .str("recv_method", "esmtp")
                    .str("injection_time", &injection_time)
                    .opt("queue", e.queue.as_deref());
                out.end();
            }
        }
        "injection" => {
            let from = e.msg_from.as_deref().unwrap_or("");
            let mut f = out.begin(kind, class, event_id(0), e.timestamp_ms);
            common(&mut f, &e);
            f.recipient(rcpt)
                .str("msg_from", from)
                .str("friendly_from", from)
                .opt("subject", e.subject.as_deref())
                .str("recv_method", "rest")
                .str("injection_time", &rfc3339(e.timestamp_ms));
            if e.sandbox {
                f.str("sending_sandbox", "1");
            }
            out.end();
        }
        "delivery" | "transient_failure" | "delayed" | "bounce" | "expiration" | "admin_bounce" => {
            let mut f = out.begin(kind, class, event_id(0), e.timestamp_ms);
            common(&mut f, &e);
            f.recipient(rcpt)
                .str("msg_from", sender)
                .opt("sending_ip", e.sending_ip.as_deref());
            if let Some(peer) = e.peer.as_deref() {
                match peer.parse::<std::net::SocketAddr>() {
                    Ok(addr) => f.str("ip_address", &addr.ip().to_string()),
                    Err(_) => f.str("ip_address", peer),
                };
            }
            f.num("queue_time", e.queue_time)
                .num("num_retries", e.num_retries)
                .str("delv_method", "esmtp")
                .str("outbound_tls", if e.tls.is_some() { "1" } else { "0" })
                .opt("egress_source", e.egress_source.as_deref());
            let response = e.response.as_deref().unwrap_or("");
            if gannet_type == "delivery" {
                f.str("raw_reason", response);
            } else {
                f.failure(response);
                let class = match gannet_type {
                    "expiration" => Some(24),
                    "admin_bounce" => Some(25),
                    "bounce" => e.bounce_class,
                    _ => None,
                };
                f.num("bounce_class", class);
            }
            out.end();
        }
        "policy_rejection" => {
            let mut f = out.begin(kind, class, event_id(0), e.timestamp_ms);
            common(&mut f, &e);
            if !rcpt.is_empty() {
                f.recipient(rcpt);
            }
            f.opt("msg_from", e.sender.as_deref())
                .failure(e.reply.as_deref().unwrap_or(""))
                .opt("remote_addr", e.peer.as_deref())
                .opt("phase", e.phase.as_deref());
            out.end();
        }
        "generation_failure" => {
            let reason = e.reason.as_deref().unwrap_or("");
            let mut f = out.begin(kind, class, event_id(0), e.timestamp_ms);
            common(&mut f, &e);
            f.recipient(rcpt)
                .str("raw_reason", reason)
                .str("reason", reason)
                .str("error_code", "554");
            out.end();
        }
        _ => {
            // open, click
            let mut f = out.begin(kind, class, event_id(0), e.timestamp_ms);
            common(&mut f, &e);
            f.recipient(rcpt)
                .opt("user_agent", e.user_agent.as_deref())
                .opt("ip_address", e.ip_address.as_deref())
                .opt("target_link_url", e.target_link_url.as_deref());
            out.end();
        }
    }
    Ok(())
}

/// Events that are SparkPost's already in gannet's names (out_of_band,
/// spam_complaint, list_unsubscribe) and gannet's own: their fields as they are,
/// with SparkPost's recipient fields and numbers as strings. Rare: parsed whole.
fn convert_as_is(
    line: &[u8],
    kind: &'static str,
    class: &str,
    event_id: String,
    filter: &Filter,
    out: &mut Events,
) -> Result<(), String> {
    let Value::Object(event) = serde_json::from_slice::<Value>(line).map_err(|e| e.to_string())?
    else {
        return Err("not an object".into());
    };
    let tenant = event.get("tenant").and_then(Value::as_str);
    if filter.tenant.is_some() && filter.tenant.as_deref() != tenant {
        return Ok(());
    }
    let timestamp_ms = event
        .get("timestamp_ms")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let mut f = out.begin(kind, class, event_id, timestamp_ms);
    for (key, value) in &event {
        if matches!(key.as_str(), "type" | "timestamp_ms" | "rcpt_to") {
            continue;
        }
        match value {
            Value::Number(n) if key != "shard" => f.num(key, n.as_u64()),
            other => {
                f.key(key);
                let _ = serde_json::to_writer(&mut *f.out, other);
                &mut f
            }
        };
    }
    if let Some(rcpt) = event.get("rcpt_to").and_then(Value::as_str) {
        f.recipient(rcpt);
    }
    out.end();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Filter {
        Filter {
            types: TypeSet::of(&TYPES.iter().map(|t| t.0).collect::<Vec<_>>()).unwrap(),
            tenant: None,
        }
    }

    fn one(line: &str, filter: &Filter) -> Vec<Value> {
        let mut out = Events::new();
        convert(line.as_bytes(), 1, 4096, filter, &mut out).unwrap();
        let array: Vec<Value> = serde_json::from_slice(&out.array()).unwrap();
        for (item, value) in out.items.iter().zip(&array) {
            let object: Value = serde_json::from_slice(out.object(item)).unwrap();
            assert_eq!(&object, value);
        }
        array
    }

    #[test]
    fn a_reception_is_an_injection_per_recipient() {
        let line = r#"{"type":"reception","timestamp_ms":1765000000123,"message_id":"0001","shard":1,"sender":"s@a.test","rcpt_to":["X@B.test","y@c.test"],"msg_size":1234,"peer":"127.0.0.1:5000","helo":"h","protocol":"ESMTP","tenant":"acme","ip_pool":"default","queue":"acme@b.test","subject":"Hi"}"#;
        let out = one(line, &all());
        assert_eq!(out.len(), 2);
        let first = &out[0]["msys"]["message_event"];
        assert_eq!(first["type"], "injection");
        assert_eq!(first["timestamp"], "1765000000");
        assert_eq!(first["rcpt_to"], "x@b.test");
        assert_eq!(first["raw_rcpt_to"], "X@B.test");
        assert_eq!(first["routing_domain"], "b.test");
        assert_eq!(first["msg_size"], "1234");
        assert_eq!(first["recv_method"], "esmtp");
        assert_eq!(first["subject"], "Hi");
        assert_eq!(first["tenant"], "acme");
        assert_ne!(
            first["event_id"],
            out[1]["msys"]["message_event"]["event_id"]
        );
        assert!(
            first["event_id"]
                .as_str()
                .unwrap()
                .bytes()
                .all(|b| b.is_ascii_digit())
        );
    }

    #[test]
    fn events_taken_back_leave_a_whole_array() {
        let line = br#"{"type":"reception","timestamp_ms":1,"message_id":"01","shard":0,"sender":"s@a.test","rcpt_to":["x@b.test","y@c.test"],"msg_size":1,"peer":"127.0.0.1:5000","helo":"h","protocol":"ESMTP","ip_pool":"default","queue":"b.test"}"#;
        let mut out = Events::new();
        convert(line, 0, 0, &all(), &mut out).unwrap();
        convert(line, 0, 512, &all(), &mut out).unwrap();
        assert_eq!(out.len(), 4);
        out.truncate(2);
        let array: Vec<Value> = serde_json::from_slice(&out.array()).unwrap();
        assert_eq!(array.len(), 2);
        convert(line, 0, 1024, &all(), &mut out).unwrap();
        let array: Vec<Value> = serde_json::from_slice(&out.array()).unwrap();
        assert_eq!(array.len(), 4);
        out.truncate(0);
        assert!(out.is_empty());
        assert_eq!(out.array(), b"[]");
    }

    #[test]
    fn outcomes_carry_sparkposts_fields_as_strings() {
        let line = r#"{"type":"bounce","timestamp_ms":1765000000000,"shard":0,"message_id":"00ab","sender":"s@a.test","rcpt_to":"u@b.test","queue":"b.test","site":"mx.b.test","egress_source":"default","sending_ip":"10.0.0.1","peer":"192.0.2.7:25","response":"550 5.1.1 no such user","response_code":550,"enhanced_code":"5.1.1","msg_size":900,"bounce_class":10,"num_retries":2,"queue_time":3000,"tls":"TLSv1.3","ip_pool":"default","transmission_id":"77","rcpt_meta":{"k":"v"},"rcpt_tags":["t"]}"#;
        let out = one(line, &all());
        let e = &out[0]["msys"]["message_event"];
        assert_eq!(e["type"], "bounce");
        assert_eq!(e["bounce_class"], "10");
        assert_eq!(e["error_code"], "550");
        assert_eq!(e["raw_reason"], "550 5.1.1 no such user");
        assert_eq!(e["ip_address"], "192.0.2.7");
        assert_eq!(e["sending_ip"], "10.0.0.1");
        assert_eq!(e["num_retries"], "2");
        assert_eq!(e["queue_time"], "3000");
        assert_eq!(e["outbound_tls"], "1");
        assert_eq!(e["rcpt_meta"]["k"], "v");
        assert_eq!(e["rcpt_tags"][0], "t");
        assert_eq!(e["transmission_id"], "77");
    }

    #[test]
    fn filters_by_type_and_tenant() {
        let delivery = r#"{"type":"delivery","timestamp_ms":1,"shard":0,"message_id":"1","sender":"s@a.test","rcpt_to":"u@b.test","queue":"q","site":"","response":"250 ok","response_code":250,"msg_size":1,"num_retries":0,"queue_time":1,"tenant":"acme"}"#;
        let only_bounces = Filter {
            types: TypeSet::of(&["bounce"]).unwrap(),
            tenant: None,
        };
        assert!(one(delivery, &only_bounces).is_empty());
        let other_tenant = Filter {
            tenant: Some("zeta".into()),
            ..all()
        };
        assert!(one(delivery, &other_tenant).is_empty());
        let acme = Filter {
            tenant: Some("acme".into()),
            ..all()
        };
        assert_eq!(one(delivery, &acme).len(), 1);
        assert_eq!(TypeSet::of(&["delivery", "nope"]), Err("nope".to_string()));
    }

    #[test]
    fn escapes_survive_and_other_events_keep_their_fields() {
        let line = r#"{"type":"injection","timestamp_ms":1765000000000,"shard":0,"message_id":"1","transmission_id":"9","rcpt_to":"a\"b@c.test","msg_from":"f@x.test","subject":"Say \"hi\" \u00e9\n","msg_size":5,"ip_pool":"p","queue":"q","rcpt_meta":{"n":[1,2]},"rcpt_tags":null}"#;
        let e = &one(line, &all())[0]["msys"]["message_event"];
        assert_eq!(e["subject"], "Say \"hi\" é\n");
        assert_eq!(e["raw_rcpt_to"], "a\"b@c.test");
        assert_eq!(e["rcpt_meta"]["n"][1], 2);
        assert!(e.get("rcpt_tags").is_none());
        assert_eq!(e["recv_method"], "rest");
        let line = r#"{"type":"adaptive","timestamp_ms":1765000000000,"shard":1,"queue":"default->mx.test","rule":"default#0","change":"fired","until_ms":1765000060000,"actions":["suspend"],"set":""}"#;
        let deliveries = Filter {
            types: TypeSet::of(&["delivery"]).unwrap(),
            tenant: None,
        };
        assert!(one(line, &deliveries).is_empty());
        let e = &one(line, &all())[0]["msys"]["gannet_event"];
        assert_eq!(e["type"], "adaptive");
        assert_eq!(e["rule"], "default#0");
        assert_eq!(e["until_ms"], "1765000060000");
        assert_eq!(e["actions"][0], "suspend");
        assert_eq!(e["shard"], 1);
        let line = r#"{"type":"cluster","timestamp_ms":1765000000000,"shard":0,"change":"unreachable","fallback":"open","nodes":3}"#;
        assert!(
            one(line, &deliveries).is_empty(),
            "only to sinks that ask for it"
        );
        let e = &one(line, &all())[0]["msys"]["gannet_event"];
        assert_eq!(e["type"], "cluster");
        assert_eq!(e["change"], "unreachable");
        assert_eq!(e["fallback"], "open");
    }

    #[test]
    fn damaged_lines_are_errors_and_unknown_types_are_skipped() {
        let mut out = Events::new();
        assert!(convert(b"garbage", 0, 0, &all(), &mut out).is_err());
        assert!(convert(b"{\"type\":\"delivery\",", 0, 0, &all(), &mut out).is_err());
        assert!(convert(b"{\"type\":\"from_the_future\"}", 0, 0, &all(), &mut out).is_ok());
        assert!(out.is_empty());
    }
}
