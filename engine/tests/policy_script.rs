//! The Lua policy script through real clients: swaks and Python's smtplib meet
//! gannetd running a script that refuses an EHLO name and a recipient domain, fails
//! at run time for one sender and loops forever for another — each refusal is the
//! script's reply, each failure a 451 4.3.0 with an event and a counter, and the
//! shards go on accepting mail. Scripts that cannot load are refused at start and
//! by --check-config with the file and line.

mod common;

use std::process::Command;

use common::Daemon;

const SCRIPT: &str = r#"-- a policy as a KumoMTA user writes one
gannet.on("smtp_server_connection_accepted", function(conn)
  if conn:get_meta("received_from") == "192.0.2.1" then kumo.reject(421, "not you") end
end)
gannet.on("smtp_server_ehlo", function(domain, conn)
  if domain == "spammer.test" then gannet.reject(550, "5.7.1 not from you") end
end)
gannet.on("smtp_server_mail_from", function(sender, conn)
  if sender.domain == "crash.test" then
    local t = nil
    return t.field
  end
  if sender.domain == "loop.test" then
    while true do end
  end
end)
gannet.on("smtp_server_mail_rcpt_to", function(rcpt, conn)
  if rcpt.domain == "blocked.test" then
    gannet.reject(550, "5.7.1 " .. rcpt.domain .. " takes no mail from " .. conn:get_meta("ehlo_domain"))
  end
end)
"#;

fn swaks(args: &[&str]) -> (bool, String) {
    let out = Command::new("swaks")
        .args(args)
        .output()
        .expect("swaks (tools/test.sh installs it)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn script_file(dir: &std::path::Path, source: &str) -> String {
    let path = dir.join("policy.lua");
    std::fs::write(&path, source).unwrap();
    path.display().to_string()
}

#[test]
fn the_script_refuses_and_its_failures_tempfail_through_real_clients() {
    let scripts = tempfile::tempdir().unwrap();
    let path = script_file(scripts.path(), SCRIPT);
    let mut daemon = Daemon::start(
        "",
        &format!("[policy]\nscript = \"{path}\"\nscript_instruction_budget = 200000\n"),
    );
    let smtp = daemon.smtp.to_string();
    let send = |from: &str, to: &str, ehlo: &str| {
        swaks(&[
            "--server",
            &smtp,
            "--ehlo",
            ehlo,
            "--from",
            from,
            "--to",
            to,
            "--header",
            "Subject: scripted",
        ])
    };
    let (ok, out) = send("a@ok.test", "x@blocked.test", "client.test");
    assert!(
        !ok && out.contains("550 5.7.1 blocked.test takes no mail from client.test"),
        "{out}"
    );
    let (ok, out) = send("a@ok.test", "x@d.test", "spammer.test");
    assert!(!ok && out.contains("550 5.7.1 not from you"), "{out}");
    let (ok, out) = send("a@crash.test", "x@d.test", "client.test");
    assert!(
        !ok && out.contains("451 4.3.0 policy script failed; try again later"),
        "{out}"
    );
    // A hook that never returns is stopped by its budget; the shard goes on.
    let (ok, out) = send("a@loop.test", "x@d.test", "client.test");
    assert!(
        !ok && out.contains("451 4.3.0 policy script failed"),
        "{out}"
    );
    for _ in 0..4 {
        let (ok, out) = send("a@ok.test", "x@d.test", "client.test");
        assert!(ok && out.contains("250 2.0.0 OK queued as"), "{out}");
    }
    // smtplib on one connection: the refused recipient is refused alone.
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import smtplib\n\
             s = smtplib.SMTP('127.0.0.1', {})\n\
             s.ehlo('py.test')\n\
             refused = s.sendmail('p@ok.test', ['a@d.test', 'b@blocked.test'], 'Subject: py\\r\\n\\r\\nhi\\r\\n')\n\
             print(refused)\n\
             s.quit()\n",
            daemon.smtp.port()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains(
                "'b@blocked.test': (550, b'5.7.1 blocked.test takes no mail from py.test')"
            ),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(daemon.metric("policy_script_failures_total"), 2);
    let log = daemon.log.lock().unwrap().join("\n");
    assert!(
        log.contains("smtp_server_mail_from")
            && log.contains("instruction budget of 200000 exceeded"),
        "{log}"
    );
    daemon.stop();
    let events = daemon.events();
    let rejections: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["type"] == "policy_rejection")
        .map(|e| {
            (
                e["phase"].as_str().unwrap_or(""),
                e["reply"].as_str().unwrap_or(""),
            )
        })
        .collect();
    for (phase, reply) in [
        (
            "rcpt_to",
            "550 5.7.1 blocked.test takes no mail from client.test",
        ),
        ("ehlo", "550 5.7.1 not from you"),
        (
            "mail_from",
            "451 4.3.0 policy script failed; try again later",
        ),
    ] {
        assert!(
            rejections.contains(&(phase, reply)),
            "{phase} {reply}: {rejections:?}"
        );
    }
    // Five messages were accepted, none of them refused ones.
    let spooled = common::spooled(&daemon.data_dir());
    assert_eq!(spooled.len(), 5, "{}", spooled.len());
}

#[test]
fn scripts_that_do_not_load_are_refused_with_file_and_line() {
    let scripts = tempfile::tempdir().unwrap();
    for (source, said) in [
        (
            "gannet.on('smtp_server_ehlo', function(d)\n  if d then\nend)\n",
            "policy.lua:3:",
        ),
        (
            "gannet.on('smtp_server_hello', function() end)\n",
            "no hook named \"smtp_server_hello\"",
        ),
        ("while true do end\n", "instruction budget"),
    ] {
        let path = script_file(scripts.path(), source);
        let err = common::config_refused(&format!("[policy]\nscript = \"{path}\"\n"));
        assert!(
            err.contains("policy.script: ") && err.contains(said),
            "{source}: {err}"
        );
        // gannetd itself refuses to start on it, saying the same.
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gannetd.toml");
        std::fs::write(
            &config,
            common::config_text(dir.path(), "", &format!("[policy]\nscript = \"{path}\"\n")),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_gannetd"))
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("policy.script: ") && stderr.contains(said),
            "{stderr}"
        );
    }
    let err = common::config_refused("[policy]\nscript = \"/nonexistent/policy.lua\"\n");
    assert!(
        err.contains("policy.script: cannot read /nonexistent/policy.lua"),
        "{err}"
    );
    let err = common::config_refused("[policy]\nscript_instruction_budget = 5\n");
    assert!(
        err.contains("script_instruction_budget") && err.contains("between 10000 and"),
        "{err}"
    );
}

/// RCPT TO `rcpt` on a new connection: the reply's first line.
fn rcpt_reply(daemon: &Daemon, rcpt: &str) -> String {
    let mut c = daemon.connect();
    c.expect("220");
    c.send(format!("EHLO c.test\r\nMAIL FROM:<s@b.test>\r\nRCPT TO:<{rcpt}>\r\n").as_bytes());
    c.expect("250");
    c.expect("250");
    c.reply().unwrap_or_default()
}

/// Whether `rcpt` is refused (`true`) or taken on `n` connections in a row (both
/// shards are met), within 10 s.
fn settles(daemon: &Daemon, rcpt: &str, refused: bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut streak = 0;
    while std::time::Instant::now() < deadline {
        let reply = rcpt_reply(daemon, rcpt);
        if reply.starts_with("550") == refused {
            streak += 1;
            if streak == 8 {
                return true;
            }
        } else {
            streak = 0;
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    false
}

#[test]
fn sighup_swaps_the_script_under_load_and_a_bad_one_keeps_the_running_one() {
    let scripts = tempfile::tempdir().unwrap();
    let rejecting = |domain: &str| {
        format!(
            "gannet.on('smtp_server_mail_rcpt_to', function(rcpt)\n  if rcpt.domain == '{domain}' then gannet.reject(550, 'no mail for {domain}') end\nend)\n"
        )
    };
    let path = script_file(scripts.path(), &rejecting("one.test"));
    let daemon = Daemon::start("", &format!("[policy]\nscript = \"{path}\"\n"));
    assert!(settles(&daemon, "a@one.test", true));
    assert!(settles(&daemon, "a@two.test", false));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (sent, failed) =
        std::thread::scope(|scope| {
            let load = scope.spawn(|| {
                let (mut sent, mut failed) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let reply = daemon.send_message("x@ok.test", "Subject: load\r\n\r\nhi\r\n");
                    sent += 1;
                    if !reply.starts_with("250") {
                        failed.push(reply);
                    }
                }
                (sent, failed)
            });
            // A new script: the other domain refused, on every shard.
            std::fs::write(&path, rejecting("two.test")).unwrap();
            // SAFETY: signalling the child this test started.
            unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
            assert!(settles(&daemon, "a@two.test", true));
            assert!(settles(&daemon, "a@one.test", false));
            // A script that does not load: logged, and the running one stays.
            std::fs::write(&path, "gannet.on('smtp_server_mail_rcpt_to', function(\n").unwrap();
            // SAFETY: as above.
            unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !daemon.log.lock().unwrap().iter().any(|l| {
                l.contains("the policy script was not reloaded") && l.contains("policy.lua:")
            }) {
                assert!(std::time::Instant::now() < deadline, "no error logged");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert!(settles(&daemon, "a@two.test", true));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            load.join().unwrap()
        });
    assert!(sent > 0 && failed.is_empty(), "{sent} sent: {failed:?}");
}

#[test]
fn a_script_routes_by_header_setting_tenant_campaign_pool_and_fields() {
    let scripts = tempfile::tempdir().unwrap();
    let path = script_file(
        scripts.path(),
        r#"
gannet.on("smtp_server_message_received", function(msg)
  local customer = msg:get_first_named_header_value("X-Customer")
  if customer == "acme" then
    msg:set_meta("tenant", "acme")
    msg:set_meta("pool", "warm")
    msg:set_meta("campaign", msg:get_first_named_header_value("X-Campaign-Name") or "none")
  elseif customer == "blocked" then
    gannet.reject(550, "5.7.1 customer " .. customer .. " may not send")
  elseif customer == "bad-meta" then
    msg:set_meta("queue", "custom")
  end
  msg:import_x_headers({ "X-Campaign-Name" })
  msg:remove_all_named_headers("X-Customer")
  msg:append_header("X-Routed", "by-script; rcpts=" .. #msg:recipients() .. "; from=" .. msg:sender().domain)
end)
"#,
    );
    let mut daemon = Daemon::start("", &format!("[policy]\nscript = \"{path}\"\n"));
    let reply = daemon.send_message(
        "a@dest.test",
        "Subject: routed\r\nX-Customer: acme\r\nX-Campaign-Name: spring\r\n\r\nhello\r\n",
    );
    assert!(reply.starts_with("250 "), "{reply}");
    let reply = daemon.send_message(
        "a@dest.test",
        "Subject: refused\r\nX-Customer: blocked\r\n\r\nhello\r\n",
    );
    assert!(
        reply.starts_with("550 5.7.1 customer blocked may not send"),
        "{reply}"
    );
    let reply = daemon.send_message(
        "a@dest.test",
        "Subject: bad\r\nX-Customer: bad-meta\r\n\r\nhello\r\n",
    );
    assert!(
        reply.starts_with("451 4.3.0 policy script failed"),
        "{reply}"
    );
    let reply = daemon.send_message("b@dest.test", "Subject: plain\r\n\r\nhello\r\n");
    assert!(reply.starts_with("250 "), "{reply}");
    assert!(
        daemon
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("is gannet's to name")),
        "{:#?}",
        daemon.log.lock().unwrap()
    );
    daemon.stop();
    let mut spooled = common::spooled(&daemon.data_dir());
    spooled.sort_by(|a, b| a.recipients.cmp(&b.recipients));
    assert_eq!(spooled.len(), 2);
    let meta = |m: &common::Spooled, key: &str| {
        m.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let routed = &spooled[0];
    assert_eq!(meta(routed, "tenant").as_deref(), Some("acme"));
    assert_eq!(meta(routed, "campaign").as_deref(), Some("spring"));
    assert_eq!(meta(routed, "pool").as_deref(), Some("warm"));
    // A script's own metadata is kept with the message.
    assert_eq!(meta(routed, "x_campaign_name").as_deref(), Some("spring"));
    // The scheduled queue is named by campaign and tenant, as for header-set ones.
    assert!(
        routed.queue.contains("spring") && routed.queue.contains("acme"),
        "{}",
        routed.queue
    );
    let body = String::from_utf8_lossy(&routed.body);
    assert!(
        !body.contains("X-Customer")
            && body.contains("X-Routed: by-script; rcpts=1; from=b.test\r\n\r\nhello"),
        "{body}"
    );
    let plain = &spooled[1];
    assert_eq!(meta(plain, "tenant"), None);
    assert_eq!(meta(plain, "pool").as_deref(), Some("default"));
    assert!(String::from_utf8_lossy(&plain.body).contains("X-Routed: by-script"));
}

/// A policy written for KumoMTA in the style of its documentation's "custom
/// metadata" answer (the tenant from a header, `kumo.on`, the string-call syntax,
/// the handler's second argument) runs as it is: `kumo` is gannet's table.
#[test]
fn a_kumomta_style_tenant_policy_runs_unchanged() {
    let scripts = tempfile::tempdir().unwrap();
    let path = script_file(
        scripts.path(),
        r#"
kumo.on('smtp_server_message_received', function(msg, conn_meta)
  local tenant = msg:get_first_named_header_value 'X-Customer-Tenant'
  if tenant then
    msg:set_meta('tenant', tenant)
    msg:remove_all_named_headers 'X-Customer-Tenant'
  end
  msg:set_force_sync(true)
  if conn_meta:get_meta('received_from') ~= '127.0.0.1' then
    kumo.reject(451, 'unexpected peer')
  end
end)
"#,
    );
    let mut daemon = Daemon::start("", &format!("[policy]\nscript = \"{path}\"\n"));
    let reply = daemon.send_message(
        "a@dest.test",
        "Subject: t\r\nX-Customer-Tenant: globex\r\n\r\nhello\r\n",
    );
    assert!(reply.starts_with("250 "), "{reply}");
    daemon.stop();
    let spooled = common::spooled(&daemon.data_dir());
    assert_eq!(spooled.len(), 1);
    assert!(
        spooled[0]
            .meta
            .contains(&("tenant".to_string(), "globex".to_string())),
        "{:?}",
        spooled[0].meta
    );
    assert!(!String::from_utf8_lossy(&spooled[0].body).contains("X-Customer-Tenant"));
}

/// HTTP injection and relaying through the script: `smtp_server_data` imports the
/// X- headers and routes by one of them (`routing_domain`: the MX or route of
/// another domain, the recipient's queue kept); `http_message_generated` refuses a
/// recipient domain (that recipient's generation failure), sets the campaign,
/// routes the message and adds a header. Everything reaches a real SMTP server
/// (aiosmtpd) through the route of the routing domain alone.
#[test]
fn http_and_smtp_mail_is_routed_by_the_script() {
    use common::relay::{delivery_config, of, sink, wait_events};
    const KEY: &str = "script-http-key-7d21";
    let scripts = tempfile::tempdir().unwrap();
    let path = script_file(
        scripts.path(),
        r#"
gannet.on("smtp_server_data", function(msg, conn)
  msg:import_x_headers()
  local relay = msg:get_meta("x_relay")
  if relay then msg:set_meta("routing_domain", relay) end
end)
gannet.on("http_message_generated", function(msg)
  local rcpt = msg:recipient()
  if rcpt.domain == "refused.test" then gannet.reject(550, "5.7.1 no mail to " .. rcpt.domain) end
  msg:set_meta("campaign", "from-lua")
  msg:set_meta("routing_domain", "relay.test")
  msg:append_header("X-Generated-For", rcpt.user)
end)
"#,
    );
    let sink = sink();
    let digest = gannet_core::auth::KeyDigest::of(KEY);
    let daemon = Daemon::start(
        "",
        &format!(
            "api_keys = [{{ name = \"t\", key_sha256 = \"{digest}\", tenant = \"acme\" }}]\n\
             [policy]\nscript = \"{path}\"\n{}",
            delivery_config(&format!("\"relay.test\" = [\"127.0.0.1:{}\"]", sink.port))
        ),
    );
    // SMTP, with Python's smtplib: routed by its header to relay.test's route.
    let reply = daemon.send_message(
        "ann@far.test",
        "Subject: relayed\r\nX-Relay: relay.test\r\nX-Order: 7\r\n\r\nhello\r\n",
    );
    assert!(reply.starts_with("250 "), "{reply}");
    // HTTP, with curl: two recipients, one refused by the script.
    let body = serde_json::json!({
        "recipients": [{"address": "bob@elsewhere.test"}, {"address": "cy@refused.test"}],
        "content": {"from": "news@acme.test", "subject": "generated", "text": "hi"}
    });
    let (status, reply) = common::curl(
        &daemon,
        "POST",
        "/api/v1/transmissions",
        &[&format!("Authorization: {KEY}")],
        Some(("application/json", body.to_string().as_bytes())),
    );
    assert_eq!(status, 200, "{reply}");
    let events = wait_events(&daemon, "two deliveries and a failure", |events| {
        of(events, "delivery", "ann@far.test").len() == 1
            && of(events, "delivery", "bob@elsewhere.test").len() == 1
            && of(events, "generation_failure", "cy@refused.test").len() == 1
    });
    let failure = of(&events, "generation_failure", "cy@refused.test")[0];
    assert!(
        failure["reason"]
            .as_str()
            .unwrap()
            .contains("550 5.7.1 no mail to refused.test"),
        "{failure}"
    );
    let injected = of(&events, "injection", "bob@elsewhere.test")[0];
    assert_eq!(injected["campaign_id"], "from-lua", "{injected}");
    assert_eq!(injected["tenant"], "acme", "{injected}");
    // A queue of its own, named as KumoMTA names it: the recipients' domain and the
    // routing domain after `!`.
    let delivered = of(&events, "delivery", "bob@elsewhere.test")[0];
    assert_eq!(
        delivered["queue"], "from-lua:acme@elsewhere.test!relay.test",
        "{delivered}"
    );
    let delivered = of(&events, "delivery", "ann@far.test")[0];
    assert_eq!(delivered["queue"], "far.test!relay.test", "{delivered}");
    let messages = sink.messages();
    assert_eq!(messages.len(), 2, "{messages:#?}");
    let data = |rcpt: &str| {
        let m = messages
            .iter()
            .find(|m| m["rcpt_tos"][0] == rcpt)
            .unwrap_or_else(|| panic!("{rcpt} not received: {messages:#?}"));
        m["data"].as_str().unwrap().to_string()
    };
    assert!(data("bob@elsewhere.test").contains("X-Generated-For: bob"));
    assert!(data("ann@far.test").contains("X-Order: 7"));
}

/// `get_queue_config` changes a queue's retry schedule and maximum age: mail for a
/// domain whose server only ever closes the connection expires within seconds
/// under the script's max_age, while another domain on the same server keeps the
/// configuration's days (deferred, still queued).
#[test]
fn get_queue_config_changes_a_queues_retry_and_max_age() {
    use common::relay::{delivery_config, of, wait_events};
    let count = tempfile::NamedTempFile::new().unwrap();
    let (_closing, port) = common::peers::faulty_mx("close", count.path());
    let scripts = tempfile::tempdir().unwrap();
    let path = script_file(
        scripts.path(),
        r#"
kumo.on("get_queue_config", function(domain, tenant, campaign, routing_domain)
  if domain == "short.test" then
    return kumo.make_queue_config { retry_interval = 1, max_retry_interval = "1s", max_age = "3s" }
  end
end)
"#,
    );
    let daemon = Daemon::start(
        "",
        &format!(
            "[policy]\nscript = \"{path}\"\n{}",
            delivery_config(&format!(
                "\"short.test\" = [\"127.0.0.1:{port}\"], \"long.test\" = [\"127.0.0.1:{port}\"]"
            ))
        ),
    );
    for rcpt in ["a@short.test", "b@long.test"] {
        let reply = daemon.send_message(rcpt, "Subject: queued\r\n\r\nhello\r\n");
        assert!(reply.starts_with("250 "), "{reply}");
    }
    let events = wait_events(&daemon, "the short queue's expiration", |events| {
        of(events, "expiration", "a@short.test").len() == 1
            && of(events, "transient_failure", "b@long.test").len() >= 3
    });
    assert!(of(&events, "expiration", "b@long.test").is_empty());
    // Expired at the script's three seconds (the configuration's max_age is days),
    // with the last attempt's reply.
    let expired = of(&events, "expiration", "a@short.test")[0];
    let queued_ms = expired["queue_time"].as_u64().unwrap();
    assert!((3000..30_000).contains(&queued_ms), "{expired}");
    assert!(
        expired["response"]
            .as_str()
            .is_some_and(|r| r.starts_with("451 ")),
        "{expired}"
    );
    assert_eq!(daemon.metric("policy_script_failures_total"), 0);
}

/// Two policies in the style of KumoMTA's documentation — smarthosting every
/// message by its routing domain (the routing guide), and a queue config with a
/// humane duration (`get_queue_config`'s reference) — run with one change: the
/// egress pool KumoMTA sets in `make_queue_config` is the message's `pool` here
/// (a queue setting naming a pool is refused with why).
#[test]
fn kumomta_smarthost_and_queue_config_policies_port_with_one_change() {
    use common::relay::{delivery_config, of, sink, wait_events};
    let scripts = tempfile::tempdir().unwrap();
    let path = script_file(
        scripts.path(),
        r#"
kumo.on('smtp_server_message_received', function(msg)
  msg:set_meta('routing_domain', 'smarthost.test')
  -- changed: KumoMTA names the pool in make_queue_config { egress_pool = ... }
  msg:set_meta('pool', 'default')
end)
kumo.on('get_queue_config', function(domain_name, tenant, campaign, routing_domain)
  return kumo.make_queue_config {
    max_retry_interval = '20 minutes',
  }
end)
"#,
    );
    let sink = sink();
    let daemon = Daemon::start(
        "",
        &format!(
            "[policy]\nscript = \"{path}\"\n{}",
            delivery_config(&format!(
                "\"smarthost.test\" = [\"127.0.0.1:{}\"]",
                sink.port
            ))
        ),
    );
    let reply = daemon.send_message("zoe@anywhere.test", "Subject: smarthosted\r\n\r\nhi\r\n");
    assert!(reply.starts_with("250 "), "{reply}");
    let events = wait_events(&daemon, "the smarthosted delivery", |events| {
        of(events, "delivery", "zoe@anywhere.test").len() == 1
    });
    let delivered = of(&events, "delivery", "zoe@anywhere.test")[0];
    assert_eq!(
        delivered["queue"], "anywhere.test!smarthost.test",
        "{delivered}"
    );
    assert_eq!(sink.messages().len(), 1);
    // The queue config loaded ('20 minutes' is a duration gannet reads).
    assert_eq!(daemon.metric("policy_script_failures_total"), 0);
}

/// `get_egress_path_config` shapes a ready queue: the limits the script gives the
/// path to one routing domain's site are the queue's configured limits in the admin
/// API's listing, while another site keeps the configuration's.
#[test]
fn get_egress_path_config_shapes_a_ready_queue() {
    use common::admin::{admin_key_config, curl as admin_curl, json};
    use common::relay::{delivery_config, of, sink, wait_events};
    let scripts = tempfile::tempdir().unwrap();
    let path = script_file(
        scripts.path(),
        r#"
kumo.on('get_egress_path_config', function(routing_domain, egress_source, site_name)
  if routing_domain == 'shaped.test' then
    return kumo.make_egress_path {
      connection_limit = 3,
      max_deliveries_per_connection = 7,
    }
  end
end)
"#,
    );
    let (shaped, plain) = (sink(), sink());
    let daemon = Daemon::start(
        "",
        &format!(
            "{}[policy]\nscript = \"{path}\"\n{}",
            admin_key_config(),
            delivery_config(&format!(
                "\"shaped.test\" = [\"127.0.0.1:{}\"], \"plain.test\" = [\"127.0.0.1:{}\"]",
                shaped.port, plain.port
            ))
        ),
    );
    for rcpt in ["a@shaped.test", "b@plain.test"] {
        let reply = daemon.send_message(rcpt, "Subject: shaped\r\n\r\nhi\r\n");
        assert!(reply.starts_with("250 "), "{reply}");
    }
    wait_events(&daemon, "both deliveries", |events| {
        of(events, "delivery", "a@shaped.test").len() == 1
            && of(events, "delivery", "b@plain.test").len() == 1
    });
    let (status, text) = admin_curl(&daemon, "GET", "/api/admin/queues/v1", None);
    assert_eq!(status, 200, "{text}");
    let listing = json(&text);
    let ready = |port: u16| {
        let name = format!("default->127.0.0.1:{port}");
        listing["ready"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == name.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{name} not listed: {listing:#}"))
    };
    let shaped_q = ready(shaped.port);
    assert_eq!(shaped_q["configured"]["connection_limit"], 3, "{shaped_q}");
    assert_eq!(
        shaped_q["configured"]["max_deliveries_per_connection"], 7,
        "{shaped_q}"
    );
    let plain_q = ready(plain.port);
    assert_eq!(plain_q["configured"]["connection_limit"], 32, "{plain_q}");
    assert_eq!(daemon.metric("policy_script_failures_total"), 0);

    // Another script (SIGHUP): the ready queues made already are asked again.
    std::fs::write(
        &path,
        "kumo.on('get_egress_path_config', function(routing_domain)
           if routing_domain == 'plain.test' then return kumo.make_egress_path { connection_limit = 5 } end
         end)
",
    )
    .unwrap();
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
    let limits = || {
        let (_, text) = admin_curl(&daemon, "GET", "/api/admin/queues/v1", None);
        let listing = json(&text);
        let limit = |port: u16| {
            let name = format!("default->127.0.0.1:{port}");
            (listing["ready"].as_array().into_iter().flatten())
                .find(|q| q["name"] == name.as_str())
                .map(|q| q["configured"]["connection_limit"].clone())
        };
        (limit(shaped.port), limit(plain.port))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while limits() != (Some(32.into()), Some(5.into())) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(limits(), (Some(32.into()), Some(5.into())));
}

/// `should_enqueue_log_record`, in KumoMTA's webhook example's form (`log_record`
/// from the message object, `set_meta('queue', …)`), decides which events a webhook
/// (a real HTTP receiver) is sent: a tenant's are kept from it, a failing call sends
/// its event and is counted, and the other events arrive.
#[test]
fn should_enqueue_log_record_keeps_events_from_a_webhook() {
    use common::admin::curl_as;
    use common::peers::webhook_receiver;
    let scripts = tempfile::tempdir().unwrap();
    let path = script_file(
        scripts.path(),
        r#"
kumo.on('smtp_server_message_received', function(msg)
  msg:set_meta('tenant', msg:get_first_named_header_value('X-Customer-Tenant'))
end)
kumo.on('should_enqueue_log_record', function(msg, hook_name)
  local log_record = msg:get_meta 'log_record'
  if log_record.tenant == 'broken' then error('cannot decide') end
  if msg:get_meta('tenant') == 'quiet' then return false end
  if log_record.queue ~= 'webhook' then
    msg:set_meta('queue', 'webhook')
    return true
  end
  return false
end)
"#,
    );
    const KEY: &str = "hook-key-7d0c2b9e4f1a6358";
    let keys = format!(
        "api_keys = [{{ name = \"app\", key_sha256 = \"{}\" }}]\n[policy]\nscript = \"{path}\"\n",
        gannet_core::auth::KeyDigest::of(KEY)
    );
    let out = tempfile::tempdir().unwrap();
    let (_receiver, port) = webhook_receiver(out.path(), 200);
    let dir = tempfile::tempdir().unwrap();
    let text = common::config_text(dir.path(), "", &keys)
        + "[events]\nbatch_wait_ms = 100\nretry_interval_max_secs = 1\n";
    let mut daemon = Daemon::start_in(dir, &text);
    let body = serde_json::json!({
        "name": "receptions",
        "target": format!("http://127.0.0.1:{port}/hook"),
        "events": ["injection"],
    });
    let (status, answer) = curl_as(
        &daemon,
        Some(KEY),
        "POST",
        "/api/v1/webhooks",
        Some(("application/json", &body.to_string())),
    );
    assert_eq!(status, 200, "{answer}");
    for tenant in ["acme", "quiet", "broken", "acme"] {
        let reply = daemon.send_message(
            &format!("{tenant}@dest.test"),
            &format!("Subject: t\r\nX-Customer-Tenant: {tenant}\r\n\r\nhello\r\n"),
        );
        assert!(reply.starts_with("250 "), "{reply}");
    }
    // The receiver stores each POST as a JSON file: {"path", "headers", "body"}.
    let tenants = |out: &std::path::Path| -> Vec<String> {
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(out).unwrap().flatten() {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(
                &std::fs::read(entry.path()).unwrap_or_default(),
            ) else {
                continue;
            };
            for event in v["body"].as_array().into_iter().flatten() {
                if let Some(t) = event["msys"]["message_event"]["tenant"].as_str() {
                    seen.push(t.to_string());
                }
            }
        }
        seen.sort();
        seen
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while tenants(out.path()).len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(tenants(out.path()), ["acme", "acme", "broken"]);
    assert_eq!(daemon.metric("hose_events_declined_total"), 1);
    assert_eq!(daemon.metric("hose_script_failures_total"), 1);
    daemon.stop();
}
