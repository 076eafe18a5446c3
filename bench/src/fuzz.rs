//! The fuzz harnesses: one function per parser that reads input from outside, each
//! taking arbitrary bytes. `bench/fuzz/` runs them under libFuzzer (cargo-fuzz, on
//! nightly; `bench/fuzz.sh`), and `tests/fuzz_corpus.rs` replays the kept corpus and
//! every crash found so far on the stable toolchain in the test command, so a fixed
//! crash stays fixed. A harness panics only where the code under test is wrong.

use gannet_core::address;
use gannet_core::config::Config;
use gannet_core::message::{MetaHeaders, Trace, prepare};
use gannet_engine::delivery::client::take_reply;
use gannet_engine::ingress::smtp::data::{Scan, Scanner};
use gannet_engine::ingress::smtp::verbs;
use gannet_engine::merge::template::{Flavor, Scope, Template};
use gannet_engine::merge::tracking::{Track, TrackingKey};
use gannet_engine::merge::transmission::Spec;
use gannet_spool::record::{Kind, RECORD_HEADER_BYTES, encode_header, record_len};
use gannet_spool::segment::{SEGMENT_HEADER_BYTES, SegmentHeader};
use gannet_spool::{FileStorage, Spool, SpoolConfig, segment_file_name};

/// SMTP command arguments as a client sends them: paths with parameters (MAIL FROM,
/// RCPT TO), and AUTH responses (base64, PLAIN). Every line of the input is tried as
/// each; nothing may panic, and what parses must be consistent.
pub fn smtp_command(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.split("\r\n") {
        for allow_null in [false, true] {
            if let Ok(addr) = address::parse_path(line, allow_null) {
                let _ = format!("{addr:?}");
            }
        }
        let (path, params) = line.split_once(' ').unwrap_or((line, ""));
        let _ = address::parse_path(path, true);
        if let Ok(params) = address::parse_params(params) {
            let _ = format!("{params:?}");
        }
        if let Ok(decoded) = verbs::auth_decode(line) {
            let _ = verbs::auth_plain(&decoded);
        }
    }
    let _ = verbs::auth_plain(data);
}

/// The DATA and BDAT scanner over arbitrary bytes fed in arbitrary splits, then the
/// header checks and Received/Message-ID stamping of what it produced: no panic, the
/// body never grows past its bound, and the scanner consumes only what it was given.
pub fn smtp_data(data: &[u8]) {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let line_max = 64 + usize::from(control & 0x3f) * 16;
    let body_max = 1024 + usize::from(control) * 64;
    let normalize = control & 0x40 != 0;
    // Split points come from the input itself.
    let step = 1 + usize::from(control % 7);
    let mut scanner = if control & 0x80 != 0 {
        Scanner::bdat(line_max, body_max, normalize)
    } else {
        Scanner::data(line_max, body_max, normalize)
    };
    let mut body = Vec::new();
    let mut at = 0;
    while at < input.len() {
        let end = (at + step).min(input.len());
        match scanner.feed(&input[at..end], &mut body) {
            Scan::More => at = end,
            Scan::End(n) => {
                assert!(n <= end - at);
                break;
            }
        }
        assert!(body.len() <= body_max + line_max + 2);
    }
    if control & 0x80 != 0 {
        scanner.finish_chunks(&mut body);
    }
    let meta = MetaHeaders {
        tenant: "x-gannet-tenant".into(),
        campaign: "x-gannet-campaign".into(),
        pool: "x-gannet-pool".into(),
        expires: "x-gannet-expires".into(),
    };
    let trace = Trace {
        helo: "client.test",
        peer_ip: "127.0.0.1".parse().unwrap(),
        hostname: "gannet.test",
        protocol: "ESMTP",
        tls: None,
        id: "0123456789abcdef",
        single_recipient: Some("a@b.test"),
        unix_secs: 1_700_000_000,
    };
    let _ = prepare(&body, &meta, &trace);
    let _ = prepare(input, &meta, &trace);
}

/// Replies from a remote SMTP server, as the delivery client reads them: arbitrary
/// bytes taken reply by reply. No panic; a reply taken consumes only whole lines.
pub fn smtp_reply(data: &[u8]) {
    let mut input = data.to_vec();
    loop {
        let before = input.len();
        match take_reply(&mut input) {
            Ok(Some(reply)) => {
                assert!(input.len() < before);
                assert!(reply.code <= 999);
                let _ = reply.enhanced_code();
                let _ = reply.enhanced();
                let _ = reply.to_string();
            }
            Ok(None) => {
                assert_eq!(input.len(), before);
                break;
            }
            Err(_) => break,
        }
    }
}

/// SparkPost's template language: arbitrary template text (both flavours), rendered
/// over substitution data that is itself fuzzed JSON. The input is the template, a
/// NUL, then the JSON.
pub fn template(data: &[u8]) {
    let (source, json) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (
            data,
            &b"{\"name\":\"Ann\",\"items\":[1,\"two\",{\"x\":3}],\"n\":2}"[..],
        ),
    };
    let Ok(source) = std::str::from_utf8(source) else {
        return;
    };
    let values: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(json).unwrap_or_default();
    let empty = serde_json::Map::new();
    let layers = [&values, &empty];
    for flavor in [Flavor::Text, Flavor::Html] {
        if let Ok(template) = Template::parse(source, flavor) {
            let _ = template.render_to_string(Scope { layers: &layers });
        }
    }
}

/// Click and open tracking of a sender's HTML: every link rewritten through a signed
/// token that must open back to the URL it replaced; nothing may panic.
pub fn html_tracking(data: &[u8]) {
    let Ok(html) = std::str::from_utf8(data) else {
        return;
    };
    let key = TrackingKey::new(b"0123456789abcdef0123456789abcdef");
    for (open, click) in [(true, true), (false, true), (true, false)] {
        let track = Track {
            key: &key,
            base_url: "https://t.test",
            open,
            click,
            message_id: "m",
            rcpt_to: "a@b.test",
            transmission_id: "t",
            campaign_id: "c",
            tenant: "acme",
            template_id: "w",
        };
        let out = track.apply(html);
        // Every click link in the output is one the rewriting made (unless the
        // sender's HTML already held the prefix), and its token opens.
        if html.contains("https://t.test/c/") {
            continue;
        }
        for (at, _) in out.match_indices("https://t.test/c/") {
            let token: String = out[at + 17..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            assert!(
                key.open(&token).is_some(),
                "a token that does not open: {token}"
            );
        }
    }
    let _ = key.open(html);
}

/// The bodies of the HTTP API: a transmission (SparkPost's shape) is parsed, its
/// content compiled as the API would (templates, MIME parts, attachments), and a
/// preview rendered; KumoMTA's inject body and the admin and template bodies are
/// parsed. No input may panic.
pub fn json_api(data: &[u8]) {
    let Ok(spec) = serde_json::from_slice::<Spec>(data) else {
        let _ = serde_json::from_slice::<serde_json::Value>(data);
        return;
    };
    if let Some(content) = &spec.content {
        for substitute in [true, false] {
            if let Ok(compiled) = content.compile(substitute) {
                let empty = serde_json::Map::new();
                let layers = [&spec.substitution_data, &empty];
                let _ = compiled.preview(Scope { layers: &layers });
            }
        }
    }
}

/// The TOML configuration: any text is parsed and checked; an error must name a
/// line of the text, and nothing may panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, "fuzz.toml") {
        Ok(config) => {
            let _ = config.resolve();
        }
        Err(err) => {
            let _ = err.to_string();
        }
    }
}

const SEGMENT_BYTES: usize = 64 << 10;

/// Spool recovery from arbitrary bytes on disk. The input describes a segment file:
/// a first byte choosing how much of it is made valid (nothing; the segment header;
/// the header and every record's checksums), then pieces, each a kind byte, a length
/// byte and that many bytes of payload. Records whose checksums the harness makes
/// right reach rkyv's validation with arbitrary payloads. Recovery must report
/// damage, never panic, and every live message it returns must read back whole.
pub fn spool_recovery(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut image = vec![0u8; SEGMENT_BYTES];
    let seq = 1u64;
    if mode % 3 == 0 {
        let n = rest.len().min(SEGMENT_BYTES);
        image[..n].copy_from_slice(&rest[..n]);
    } else {
        let header = SegmentHeader {
            shard: 0,
            seq,
            len: SEGMENT_BYTES as u64,
            created_unix_ms: 1,
        };
        image[..SEGMENT_HEADER_BYTES].copy_from_slice(&header.encode());
        let mut at = SEGMENT_HEADER_BYTES;
        while rest.len() >= 2 {
            let (kind, len) = (rest[0], usize::from(rest[1]) * 4);
            rest = &rest[2..];
            let payload = &rest[..len.min(rest.len())];
            rest = &rest[payload.len()..];
            if at + record_len(payload.len()) > SEGMENT_BYTES {
                break;
            }
            if mode % 3 == 2 {
                let kind = match kind % 3 {
                    0 => Kind::Message,
                    1 => Kind::Update,
                    _ => Kind::Tombstone,
                };
                encode_header(
                    &mut image[at..at + RECORD_HEADER_BYTES],
                    kind,
                    payload,
                    seq,
                    at,
                );
            } else {
                let n = RECORD_HEADER_BYTES.min(payload.len());
                image[at..at + n].copy_from_slice(&payload[..n]);
            }
            let start = at + RECORD_HEADER_BYTES;
            image[start..start + payload.len()].copy_from_slice(payload);
            at += record_len(payload.len());
        }
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(segment_file_name(seq)), &image).unwrap();
    let storage = FileStorage::read_only(dir.path()).unwrap();
    if let Ok((_, recovered)) = Spool::open(storage, SpoolConfig::for_shard(0)) {
        for live in &recovered.live {
            let m = live.message.get();
            let _ = (
                m.sender.len(),
                m.recipients.len(),
                m.meta.len(),
                m.body.len(),
            );
        }
        let _ = recovered.report.torn_bytes();
    }
}

/// A harness: arbitrary bytes in, a panic only where the code under test is wrong.
pub type Harness = fn(&[u8]);

/// Every harness by name (the directory names under `bench/fuzz/corpus/`).
pub const TARGETS: &[(&str, Harness)] = &[
    ("smtp_command", smtp_command),
    ("smtp_data", smtp_data),
    ("smtp_reply", smtp_reply),
    ("template", template),
    ("html_tracking", html_tracking),
    ("json_api", json_api),
    ("config", config),
    ("spool_recovery", spool_recovery),
];
