//! SparkPost's Metrics API, computed from gannet's own events: transmissions (a
//! stored template, a suppressed recipient, a hard bounce, a deferral), an SMTP
//! message, an open and a click — then the summary, the groupings, the time series
//! and the lists as curl and SparkPost's Python client ask for them, a tenant's key
//! seeing its own mail only, bad forms refused with 400s that say why, and every
//! count the same after `kill -9` and a restart on the same ports (the tally is
//! journaled with the log positions it reached: nothing counted twice or lost).

mod common;

use std::path::Path;

use common::peers::free_port;
use common::relay::{sink, wait_events};
use common::{Daemon, curl, sparkpost_client};
use serde_json::{Value, json};

const KEY: &str = "metrics-key-4c2a9e7b1d3f5a68";
const ZETA: &str = "metrics-zeta-8b6d4f2a0c1e3957";

/// A config on fixed loopback ports (a restart finds them again) relaying x.test
/// and y.test to `sink`, with an HTTPS listener for the Python client.
fn config(dir: &Path, ports: [u16; 3], sink: u16) -> String {
    let digest = gannet_core::auth::KeyDigest::of;
    let [smtp, http, https] = ports;
    format!(
        "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = 2\n\
         [smtp]\nlisten = [\"127.0.0.1:{smtp}\"]\n\
         [http]\nlisten = [\"127.0.0.1:{http}\"]\ntls_listen = [\"127.0.0.1:{https}\"]\n\
         api_keys = [{{ name = \"app\", key_sha256 = \"{}\" }}, {{ name = \"zeta\", key_sha256 = \"{}\", tenant = \"zeta\" }}]\n\
         [delivery]\nretry_interval_secs = 1\nmax_retry_interval_secs = 1\n\
         routes = {{ \"x.test\" = [\"127.0.0.1:{sink}\"], \"y.test\" = [\"127.0.0.1:{sink}\"] }}\n\
         [events]\nbatch_wait_ms = 200\n",
        dir.join("data").display(),
        digest(KEY),
        digest(ZETA)
    )
}

fn call(
    daemon: &Daemon,
    key: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = curl(
        daemon,
        method,
        path,
        &[&format!("Authorization: {key}")],
        body.as_ref().map(|b| ("application/json", b.as_bytes())),
    );
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

fn get(daemon: &Daemon, key: &str, path: &str) -> Value {
    let (status, value) = call(daemon, key, "GET", path, None);
    assert_eq!(status, 200, "{path}: {value}");
    value
}

/// The window from an hour ago: `from=YYYY-MM-DDTHH:MM` (UTC).
fn from_param() -> String {
    let now = gannet_core::clock::unix_ms() - 3_600_000;
    let text = gannet_core::clock::rfc3339(now);
    format!("from={}", &text[..16])
}

/// Takes the tracking URL after `marker` out of a delivered message (its HTML part
/// may be quoted-printable).
fn tracking_url(data: &str, base: &str, marker: &str) -> String {
    let plain = data
        .replace("=\r\n", "")
        .replace("=\n", "")
        .replace("=3D", "=");
    let at = plain
        .find(&format!("{base}{marker}"))
        .unwrap_or_else(|| panic!("{marker} in {plain}"));
    plain[at + base.len()..]
        .split('"')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn deliverability_metrics_come_from_the_events_and_survive_kill_9() {
    let sink = sink();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        [free_port(), free_port(), free_port()],
        sink.port,
    );
    let mut daemon = Daemon::start_in(dir, &config);

    let (status, reply) = call(
        &daemon,
        KEY,
        "PUT",
        "/api/v1/suppression-list",
        Some(&json!({"recipients": [{"recipient": "sup@x.test", "type": "non_transactional"}]})),
    );
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = call(
        &daemon,
        KEY,
        "POST",
        "/api/v1/templates",
        Some(
            &json!({"id": "welcome", "name": "Welcome", "published": true,
            "content": {"from": "news@acme.test", "subject": "hi",
                "html": "<html><body><a href=\"https://shop.test/\">shop</a></body></html>"}}),
        ),
    );
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = call(
        &daemon,
        KEY,
        "POST",
        "/api/v1/transmissions",
        Some(&json!({
            "campaign_id": "spring",
            "options": {"open_tracking": true, "click_tracking": true},
            "recipients": [
                {"address": "ann@x.test"}, {"address": "bob@y.test"},
                {"address": "permfail@x.test"}, {"address": "sup@x.test"},
                {"address": "tempfail@y.test"}
            ],
            "content": {"template_id": "welcome"}
        })),
    );
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = call(
        &daemon,
        ZETA,
        "POST",
        "/api/v1/transmissions",
        Some(&json!({
            "campaign_id": "fall",
            "recipients": [{"address": "zed@y.test"}],
            "content": {"from": "z@zeta.test", "subject": "z", "text": "z"}
        })),
    );
    assert_eq!(status, 200, "{reply}");
    daemon.send_accepted("smtp@x.test", "Subject: s\r\n\r\nbody\r\n");

    // An open and a click of ann's message, and a second open.
    let messages = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let m = sink.messages();
            if m.iter().any(|m| m["rcpt_tos"][0] == "ann@x.test") {
                break m;
            }
            assert!(std::time::Instant::now() < deadline, "ann's message");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let ann = messages
        .iter()
        .find(|m| m["rcpt_tos"][0] == "ann@x.test")
        .unwrap();
    let base = format!("http://{}", daemon.http);
    let data = ann["data"].as_str().unwrap();
    for path in [
        tracking_url(data, &base, "/o/"),
        tracking_url(data, &base, "/o/"),
        tracking_url(data, &base, "/c/"),
    ] {
        let out = std::process::Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{base}{path}"))
            .output()
            .unwrap();
        let status = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(status == "200" || status == "302", "{path}: {status}");
    }
    wait_events(&daemon, "every outcome", |e| {
        let n = |t: &str| e.iter().filter(|e| e["type"] == t).count();
        n("delivery") >= 4 && n("bounce") >= 1 && n("transient_failure") >= 1 && n("click") >= 1
    });

    let all = "count_targeted,count_injected,count_rejected,count_policy_rejection,count_sent,count_delivered,count_delivered_first,count_bounce,count_inband_bounce,count_hard_bounce,count_delayed_first,count_rendered,count_unique_rendered,count_clicked,count_unique_clicked,count_unique_confirmed_opened,total_msg_volume,count_accepted";
    let summary_path = format!(
        "/api/v1/metrics/deliverability?{}&metrics={all}",
        from_param()
    );
    // The tally follows the events within a batch wait (1 s).
    let summary = {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let v = get(&daemon, KEY, &summary_path);
            let r = &v["results"][0];
            if r["count_delivered"] == 4 && r["count_clicked"] == 1 && r["count_rendered"] == 2 {
                break v;
            }
            assert!(std::time::Instant::now() < deadline, "the tally: {v}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    let r = &summary["results"][0];
    // 5 + 1 transmission recipients, 1 suppressed; 1 SMTP message.
    assert_eq!(r["count_injected"], 6, "{r}");
    assert_eq!(r["count_policy_rejection"], 1, "{r}");
    assert_eq!(r["count_rejected"], 1, "{r}");
    assert_eq!(r["count_targeted"], 7, "{r}");
    assert_eq!(r["count_delivered_first"], 4, "{r}");
    assert_eq!(r["count_inband_bounce"], 1, "{r}");
    assert_eq!(r["count_hard_bounce"], 1, "{r}");
    assert_eq!(r["count_bounce"], 1, "{r}");
    assert_eq!(r["count_sent"], 5, "{r}");
    assert_eq!(r["count_accepted"], 4, "{r}");
    assert_eq!(r["count_delayed_first"], 1, "{r}");
    assert_eq!(r["count_unique_rendered"], 1, "{r}");
    assert_eq!(r["count_unique_clicked"], 1, "{r}");
    assert_eq!(r["count_unique_confirmed_opened"], 1, "{r}");
    assert!(r["total_msg_volume"].as_u64().unwrap() > 400, "{r}");

    // Grouped by recipient domain, campaign, template, subaccount.
    let by = |what: &str, metrics: &str| {
        get(
            &daemon,
            KEY,
            &format!(
                "/api/v1/metrics/deliverability/{what}?{}&metrics={metrics}",
                from_param()
            ),
        )["results"]
            .clone()
    };
    let domains = by("domain", "count_injected,count_delivered");
    let domain = |d: &str| {
        domains
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["domain"] == d)
            .unwrap_or_else(|| panic!("{d} in {domains}"))
            .clone()
    };
    assert_eq!(domain("x.test")["count_injected"], 3, "{domains}");
    assert_eq!(domain("x.test")["count_delivered"], 2, "{domains}");
    assert_eq!(domain("y.test")["count_injected"], 3, "{domains}");
    let campaigns = by("campaign", "count_injected");
    assert_eq!(
        campaigns[0],
        json!({"campaign_id": "spring", "count_injected": 4}),
        "{campaigns}"
    );
    let templates = by("template", "count_clicked");
    assert_eq!(
        templates[0],
        json!({"template_id": "welcome", "count_clicked": 1}),
        "{templates}"
    );
    let tenants = by("subaccount", "count_injected");
    assert!(
        tenants
            .as_array()
            .unwrap()
            .contains(&json!({"subaccount_id": "zeta", "count_injected": 1})),
        "{tenants}"
    );
    assert!(
        tenants
            .as_array()
            .unwrap()
            .contains(&json!({"subaccount_id": 0, "count_injected": 5})),
        "{tenants}"
    );
    let series = get(
        &daemon,
        KEY,
        &format!(
            "/api/v1/metrics/deliverability/time-series?{}&precision=hour&metrics=count_injected",
            from_param()
        ),
    );
    let points = series["results"].as_array().unwrap();
    assert_eq!(points.len(), 2, "{series}");
    let total: u64 = points
        .iter()
        .map(|p| p["count_injected"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 6, "{series}");

    // The tenant's key sees its tenant only.
    let zeta = get(
        &daemon,
        ZETA,
        &format!(
            "/api/v1/metrics/deliverability?{}&metrics=count_injected,count_delivered",
            from_param()
        ),
    );
    assert_eq!(
        zeta["results"][0],
        json!({"count_injected": 1, "count_delivered": 1})
    );

    // SparkPost's Python client lists campaigns and domains.
    let listed = sparkpost_client(
        &daemon,
        KEY,
        r#"
print(json.dumps({"campaigns": sp.metrics.campaigns.list(), "domains": sp.metrics.domains.list(params={"match": "Y.T"})}))
"#,
    );
    assert_eq!(listed["campaigns"], json!(["fall", "spring"]), "{listed}");
    assert_eq!(listed["domains"], json!(["y.test"]), "{listed}");
    let zeta = sparkpost_client(
        &daemon,
        ZETA,
        "print(json.dumps(sp.metrics.campaigns.list()))",
    );
    assert_eq!(zeta, json!(["fall"]));
    let (status, reply) = call(&daemon, KEY, "GET", "/api/v1/metrics/", None);
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["links"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["rel"] == "deliverability")
    );

    // Bad forms: a 400 that names what is wrong, a 404, a 405; the shard goes on.
    let from = from_param();
    for (path, status, says) in [
        (
            "/api/v1/metrics/deliverability?metrics=count_injected".to_string(),
            400,
            "from is required",
        ),
        (
            format!("/api/v1/metrics/deliverability?{from}"),
            400,
            "metrics is required",
        ),
        (
            format!("/api/v1/metrics/deliverability?{from}&metrics=count_nonsense"),
            400,
            "count_nonsense",
        ),
        (
            "/api/v1/metrics/deliverability?from=yesterday&metrics=count_injected".to_string(),
            400,
            "YYYY-MM-DDTHH:MM",
        ),
        (
            format!(
                "/api/v1/metrics/deliverability?{from}&metrics=count_injected&timezone=Mars%2FOlympus"
            ),
            400,
            "timezone",
        ),
        (
            format!(
                "/api/v1/metrics/deliverability?{from}&metrics=count_injected&query_filters=%7Bnope"
            ),
            400,
            "not JSON",
        ),
        (
            format!(
                "/api/v1/metrics/deliverability/domain?{from}&metrics=count_injected&limit=100000"
            ),
            400,
            "limit",
        ),
        (
            format!("/api/v1/metrics/deliverability/colour?{from}&metrics=count_injected"),
            404,
            "no metrics endpoint",
        ),
        (
            "/api/v1/metrics/colours".to_string(),
            404,
            "no metrics endpoint",
        ),
    ] {
        let (got, reply) = call(&daemon, KEY, "GET", &path, None);
        assert_eq!(got, status, "{path}: {reply}");
        let error = reply["errors"][0].to_string();
        assert!(error.contains(says), "{path}: {reply}");
    }
    let (got, _) = call(
        &daemon,
        KEY,
        "POST",
        "/api/v1/metrics/deliverability",
        Some(&json!({})),
    );
    assert_eq!(got, 405);
    let (got, _) = call(&daemon, "wrong-key", "GET", &summary_path, None);
    assert_eq!(got, 401);

    // Every count is the same after kill -9 and a restart on the same ports.
    let before = get(&daemon, KEY, &summary_path);
    let http = daemon.http;
    daemon.kill();
    let dir = std::mem::replace(&mut daemon.dir, tempfile::tempdir().unwrap());
    let daemon = Daemon::start_in(dir, &config);
    assert_eq!(daemon.http, http, "restarted on its fixed port");
    let after = get(&daemon, KEY, &summary_path);
    let stable = |v: &Value| {
        let mut r = v["results"][0].clone();
        // The deferred recipient keeps being retried.
        r.as_object_mut().unwrap().remove("count_delayed_first");
        r
    };
    assert_eq!(stable(&after), stable(&before));
}
