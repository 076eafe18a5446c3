//! gannet's events in SparkPost's webhook format: each event line of a shard's log
//! becomes one or more `{"msys": {"<class>": {...}}}` objects with SparkPost's field
//! names and types (numbers as strings, timestamps as unix seconds in a string).
//!
//! A reception (an SMTP message) becomes one `injection` per recipient; transient
//! failures and deferrals without an attempt are `delay`; bounces, expirations and an
//! operator's bounces are `bounce` (bounce classes 24 and 25 for the last two). gannet's
//! own events with no SparkPost counterpart (`adaptive`, `admin_rebind`) go out in a
//! `gannet_event` object, to sinks that ask for them by name.

use serde_json::{Map, Value};

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
        _ => return None,
    })
}

/// A converted event: its SparkPost type and the `{"msys": …}` object.
#[derive(Debug)]
pub struct Converted {
    pub kind: &'static str,
    pub object: Value,
    pub timestamp_ms: u64,
}

/// Converts one log line (at position `lsn` of shard `shard`'s log) into the events
/// `filter` wants, appended to `out`. A line that is not an event gannet knows (a
/// newer version's, or damaged) is skipped: Err says why, for the log.
pub fn convert(
    line: &[u8],
    shard: u16,
    lsn: u64,
    filter: &Filter,
    out: &mut Vec<Converted>,
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
    let id = u128::from(lsn) << 16 | u128::from(shard);
    let class = TYPES
        .iter()
        .find(|t| t.0 == kind)
        .map_or("message_event", |t| t.1);
    let mut push = |index: usize, fields: Map<String, Value>| {
        let mut object = Map::new();
        object.insert("type".into(), kind.into());
        // Unique and stable: the line's position, its shard and the index of the
        // event made from it (a reception makes one per recipient).
        object.insert("event_id".into(), format!("{id}{index:05}").into());
        object.insert("timestamp".into(), (timestamp_ms / 1000).to_string().into());
        object.extend(fields);
        let mut class_object = Map::new();
        class_object.insert(class.into(), Value::Object(object));
        let mut msys = Map::new();
        msys.insert("msys".into(), Value::Object(class_object));
        out.push(Converted {
            kind,
            object: Value::Object(msys),
            timestamp_ms,
        });
    };
    let get = |key: &str| event.get(key).filter(|v| !v.is_null()).cloned();
    let text = |key: &str| event.get(key).and_then(Value::as_str).unwrap_or("");
    let number = |key: &str| {
        event
            .get(key)
            .and_then(Value::as_u64)
            .map(|n| Value::from(n.to_string()))
    };
    let mut common = Map::new();
    let put = |map: &mut Map<String, Value>, key: &str, value: Option<Value>| {
        if let Some(value) = value {
            map.insert(key.into(), value);
        }
    };
    put(&mut common, "message_id", get("message_id"));
    put(&mut common, "transmission_id", get("transmission_id"));
    put(&mut common, "campaign_id", get("campaign_id"));
    put(&mut common, "template_id", get("template_id"));
    put(&mut common, "rcpt_meta", get("rcpt_meta"));
    put(&mut common, "rcpt_tags", get("rcpt_tags"));
    put(&mut common, "ip_pool", get("ip_pool"));
    put(&mut common, "msg_size", number("msg_size"));
    put(&mut common, "tenant", get("tenant"));
    let recipient = |map: &mut Map<String, Value>, rcpt: &str| {
        map.insert("rcpt_to".into(), rcpt.to_ascii_lowercase().into());
        map.insert("raw_rcpt_to".into(), rcpt.into());
        if let Some((_, domain)) = rcpt.rsplit_once('@') {
            map.insert("routing_domain".into(), domain.to_ascii_lowercase().into());
        }
    };
    let failure = |map: &mut Map<String, Value>, reply: &str| {
        map.insert("raw_reason".into(), reply.into());
        map.insert("reason".into(), reply.into());
        let code: String = reply.chars().take_while(char::is_ascii_digit).collect();
        if !code.is_empty() {
            map.insert("error_code".into(), code.into());
        }
    };
    let injection_time = rfc3339(timestamp_ms);
    match gannet_type {
        "reception" => {
            let rcpts: Vec<&str> = event
                .get("rcpt_to")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for (index, rcpt) in rcpts.iter().enumerate() {
                let mut fields = common.clone();
                recipient(&mut fields, rcpt);
                fields.insert("msg_from".into(), text("sender").into());
                fields.insert("friendly_from".into(), text("sender").into());
                put(&mut fields, "subject", get("subject"));
                fields.insert("recv_method".into(), "esmtp".into());
                fields.insert("injection_time".into(), injection_time.clone().into());
                put(&mut fields, "queue", get("queue"));
                push(index, fields);
            }
        }
        "injection" => {
            let mut fields = common;
            recipient(&mut fields, text("rcpt_to"));
            fields.insert("msg_from".into(), text("msg_from").into());
            fields.insert("friendly_from".into(), text("msg_from").into());
            put(&mut fields, "subject", get("subject"));
            fields.insert("recv_method".into(), "rest".into());
            fields.insert("injection_time".into(), injection_time.into());
            if event.get("sandbox").and_then(Value::as_bool) == Some(true) {
                fields.insert("sending_sandbox".into(), "1".into());
            }
            push(0, fields);
        }
        "delivery" | "transient_failure" | "delayed" | "bounce" | "expiration" | "admin_bounce" => {
            let mut fields = common;
            recipient(&mut fields, text("rcpt_to"));
            fields.insert("msg_from".into(), text("sender").into());
            put(&mut fields, "sending_ip", get("sending_ip"));
            if let Some(peer) = event.get("peer").and_then(Value::as_str) {
                let ip = peer
                    .parse::<std::net::SocketAddr>()
                    .map_or(peer.to_string(), |a| a.ip().to_string());
                fields.insert("ip_address".into(), ip.into());
            }
            put(&mut fields, "queue_time", number("queue_time"));
            put(&mut fields, "num_retries", number("num_retries"));
            fields.insert("delv_method".into(), "esmtp".into());
            let tls = event.get("tls").is_some_and(|t| !t.is_null());
            fields.insert("outbound_tls".into(), if tls { "1" } else { "0" }.into());
            put(&mut fields, "egress_source", get("egress_source"));
            if gannet_type == "delivery" {
                fields.insert("raw_reason".into(), text("response").into());
            } else {
                failure(&mut fields, text("response"));
                let class = match gannet_type {
                    "expiration" => Some("24".to_string()),
                    "admin_bounce" => Some("25".to_string()),
                    "bounce" => event
                        .get("bounce_class")
                        .and_then(Value::as_u64)
                        .map(|c| c.to_string()),
                    _ => None,
                };
                if let Some(class) = class {
                    fields.insert("bounce_class".into(), class.into());
                }
            }
            push(0, fields);
        }
        "policy_rejection" => {
            let mut fields = common;
            if let Some(rcpt) = event.get("rcpt_to").and_then(Value::as_str) {
                recipient(&mut fields, rcpt);
            }
            put(&mut fields, "msg_from", get("sender"));
            failure(&mut fields, text("reply"));
            put(&mut fields, "remote_addr", get("peer"));
            put(&mut fields, "phase", get("phase"));
            push(0, fields);
        }
        "generation_failure" => {
            let mut fields = common;
            recipient(&mut fields, text("rcpt_to"));
            fields.insert("raw_reason".into(), text("reason").into());
            fields.insert("reason".into(), text("reason").into());
            fields.insert("error_code".into(), "554".into());
            push(0, fields);
        }
        "open" | "click" => {
            let mut fields = common;
            recipient(&mut fields, text("rcpt_to"));
            put(&mut fields, "user_agent", get("user_agent"));
            put(&mut fields, "ip_address", get("ip_address"));
            put(&mut fields, "target_link_url", get("target_link_url"));
            push(0, fields);
        }
        _ => {
            // Events that are SparkPost's already in gannet's names (out_of_band,
            // spam_complaint, list_unsubscribe) and gannet's own: their fields as
            // they are, with SparkPost's recipient fields and numbers as strings.
            let mut fields = Map::new();
            for (key, value) in &event {
                if matches!(key.as_str(), "type" | "timestamp_ms") {
                    continue;
                }
                let value = match value {
                    Value::Number(n) if key != "shard" => Value::from(n.to_string()),
                    other => other.clone(),
                };
                fields.insert(key.clone(), value);
            }
            if let Some(rcpt) = event.get("rcpt_to").and_then(Value::as_str) {
                recipient(&mut fields, rcpt);
            }
            push(0, fields);
        }
    }
    Ok(())
}

/// `2026-12-06T23:15:36.000Z` for unix milliseconds.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
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
        let mut out = Vec::new();
        convert(line.as_bytes(), 1, 4096, filter, &mut out).unwrap();
        out.into_iter().map(|c| c.object).collect()
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
    fn damaged_lines_are_errors_and_unknown_types_are_skipped() {
        let mut out = Vec::new();
        assert!(convert(b"garbage", 0, 0, &all(), &mut out).is_err());
        assert!(convert(b"{\"type\":\"delivery\",", 0, 0, &all(), &mut out).is_err());
        assert!(convert(b"{\"type\":\"from_the_future\"}", 0, 0, &all(), &mut out).is_ok());
        assert!(out.is_empty());
    }
}
