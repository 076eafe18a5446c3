//! The script VM on its own: loading, hooks, rejections, failures, the budget.

use std::net::{IpAddr, Ipv4Addr};

use super::{ConnSlot, Hook, Outcome, Script, failure_reply};
use crate::policy::Client;

const BUDGET: u64 = 1_000_000;

fn client() -> Client<'static> {
    Client {
        ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        helo: Some("mx.example.net"),
        tls: true,
        auth_user: None,
    }
}

fn load(source: &str) -> Script {
    Script::load("policy.lua", source, BUDGET).unwrap()
}

fn load_err(source: &str) -> String {
    Script::load("policy.lua", source, BUDGET).unwrap_err()
}

fn reply_text(outcome: Outcome) -> String {
    match outcome {
        Outcome::Reject(reply) => {
            let mut out = Vec::new();
            reply.encode(&mut out);
            String::from_utf8(out).unwrap().trim_end().to_string()
        }
        other => panic!("not a rejection: {other:?}"),
    }
}

#[test]
fn hooks_see_the_connection_and_the_addresses() {
    let script = load(
        r#"
        gannet.on("smtp_server_mail_rcpt_to", function(rcpt, conn)
          if rcpt.domain == "blocked.example" then
            gannet.reject(550, "5.7.1 no mail for " .. rcpt.user .. " at " .. tostring(rcpt))
          end
          if conn:get_meta("received_from") ~= "192.0.2.7" or conn:get_meta("tls") ~= true
             or conn:get_meta("ehlo_domain") ~= "mx.example.net" or conn:get_meta("authn_id") ~= nil then
            error("connection metadata wrong")
          end
        end)
        "#,
    );
    assert!(script.has(Hook::RcptTo) && !script.has(Hook::MailFrom));
    assert_eq!(
        script.rcpt_to(&ConnSlot::default(), &client(), "ann@ok.example"),
        Outcome::Continue
    );
    assert_eq!(
        reply_text(script.rcpt_to(&ConnSlot::default(), &client(), "bob@blocked.example")),
        "550 5.7.1 no mail for bob at bob@blocked.example"
    );
    // Hooks not registered cost nothing and say nothing.
    assert_eq!(
        script.mail_from(&ConnSlot::default(), &client(), "x@y"),
        Outcome::Continue
    );
    assert_eq!(
        script.connection_accepted(&ConnSlot::default(), &client()),
        Outcome::Continue
    );
}

#[test]
fn kumo_policies_keep_their_names() {
    let script = load(
        r#"
        kumo.on("smtp_server_ehlo", function(domain, conn)
          if domain == "bad.example" then kumo.reject(421, "go away") end
        end)
        kumo.on("smtp_server_connection_accepted", function(conn)
          kumo.set_force_sync(true)
        end)
        "#,
    );
    let mut c = client();
    c.helo = Some("bad.example");
    // No enhanced code given: one of the reply's class is chosen.
    assert_eq!(
        reply_text(script.ehlo(&ConnSlot::default(), &c)),
        "421 4.7.1 go away"
    );
    assert_eq!(
        script.connection_accepted(&ConnSlot::default(), &c),
        Outcome::Continue
    );
}

#[test]
fn a_bad_reject_and_a_runtime_error_fail_with_the_line() {
    let script = load(
        "gannet.on('smtp_server_mail_from', function(sender, conn)\n\
           if sender.domain == 'nil.example' then local t = nil; return t.x end\n\
           if sender.domain == 'code.example' then gannet.reject(250, 'fine') end\n\
           gannet.reject(451, '5.7.1 wrong class\\r\\nhidden')\n\
         end)",
    );
    match script.mail_from(&ConnSlot::default(), &client(), "a@nil.example") {
        Outcome::Failed(why) => assert!(
            why.starts_with("smtp_server_mail_from: policy.lua:2:") && why.contains("nil"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    match script.mail_from(&ConnSlot::default(), &client(), "a@code.example") {
        Outcome::Failed(why) => assert!(why.contains("250 is not a 4xx or 5xx"), "{why}"),
        other => panic!("{other:?}"),
    }
    // An enhanced code of the wrong class is text; line breaks become spaces.
    assert_eq!(
        reply_text(script.mail_from(&ConnSlot::default(), &client(), "a@other.example")),
        "451 4.7.1 5.7.1 wrong class  hidden"
    );
    let mut out = Vec::new();
    failure_reply().encode(&mut out);
    assert_eq!(out, b"451 4.3.0 policy script failed; try again later\r\n");
}

#[test]
fn a_loop_runs_out_of_budget_and_the_next_call_starts_afresh() {
    let script = Script::load(
        "policy.lua",
        "gannet.on('smtp_server_mail_rcpt_to', function(rcpt)\n\
           if rcpt.domain == 'loop.example' then while true do end end\n\
           local n = 0; for i = 1, 5000 do n = n + i end\n\
         end)",
        100_000,
    )
    .unwrap();
    match script.rcpt_to(&ConnSlot::default(), &client(), "a@loop.example") {
        Outcome::Failed(why) => assert!(
            why.contains("instruction budget of 100000 exceeded"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    // The budget is per call: a call under it runs after one that ran out.
    for _ in 0..50 {
        assert_eq!(
            script.rcpt_to(&ConnSlot::default(), &client(), "a@ok.example"),
            Outcome::Continue
        );
    }
}

#[test]
fn scripts_that_cannot_load_say_where() {
    let err = load_err("gannet.on('smtp_server_ehlo', function(d)\n  if d then\nend)");
    assert!(err.starts_with("policy.lua:3:"), "{err}");
    let err = load_err("gannet.on('smtp_server_helo', function() end)");
    assert!(
        err.contains("no hook named \"smtp_server_helo\"") && err.contains("smtp_server_ehlo"),
        "{err}"
    );
    let err = load_err(
        "gannet.on('smtp_server_ehlo', function() end)\ngannet.on('smtp_server_ehlo', function() end)",
    );
    assert!(err.contains("registered already"), "{err}");
    let err = load_err("while true do end");
    assert!(err.contains("instruction budget"), "{err}");
    // No way out of the sandbox: no io, os, package, debug, or loaders.
    for expr in [
        "io", "os", "package", "debug", "dofile", "loadfile", "load", "require",
    ] {
        let script = load(&format!(
            "gannet.on('smtp_server_connection_accepted', function() if {expr} ~= nil then gannet.reject(550, '{expr}') end end)"
        ));
        assert_eq!(
            script.connection_accepted(&ConnSlot::default(), &client()),
            Outcome::Continue,
            "{expr} is reachable"
        );
    }
    let policy = gannet_core::config::PolicyConfig {
        script: "/nonexistent/policy.lua".into(),
        ..Default::default()
    };
    let err = super::ScriptSource::from_config(&policy).unwrap_err();
    assert!(
        err.starts_with("policy.script: cannot read /nonexistent/policy.lua"),
        "{err}"
    );
}

#[test]
fn the_message_comes_back_even_when_the_script_keeps_it() {
    let script = load(
        "kept = nil\n\
         gannet.on('smtp_server_message_received', function(msg)\n\
           if kept ~= nil and kept:get_meta('tenant') ~= nil then error('kept a live message') end\n\
           kept = msg\n\
           msg:set_meta('tenant', 't1')\n\
           msg:append_header('X-Seen', tostring(msg:recipient()))\n\
           if msg:get_first_named_header_value('subject') == 'bad value' then msg:set_meta('pool', 'two words') end\n\
         end)",
    );
    let message = super::Message {
        sender: "s@a.test".into(),
        recipients: vec!["r@b.test".into()],
        body: b"Subject: hi\r\n\r\nbody\r\n".to_vec(),
        ..Default::default()
    };
    let (outcome, back) = script.smtp_message(
        &[Hook::MessageReceived],
        &ConnSlot::default(),
        &client(),
        message.clone(),
    );
    assert_eq!(outcome, Outcome::Continue);
    assert_eq!(back.meta("tenant"), Some("t1"));
    assert_eq!(
        back.body,
        b"Subject: hi\r\nX-Seen: r@b.test\r\n\r\nbody\r\n"
    );
    // The script's reference is to an emptied message now.
    let (outcome, _) = script.smtp_message(
        &[Hook::MessageReceived],
        &ConnSlot::default(),
        &client(),
        message.clone(),
    );
    assert_eq!(outcome, Outcome::Continue);
    let mut bad = message;
    bad.body = b"Subject: bad value\r\n\r\n".to_vec();
    let (outcome, back) = script.smtp_message(
        &[Hook::MessageReceived],
        &ConnSlot::default(),
        &client(),
        bad,
    );
    match outcome {
        Outcome::Failed(why) => assert!(why.contains("without spaces"), "{why}"),
        other => panic!("{other:?}"),
    }
    // What the hook did before it failed comes back with the message.
    assert_eq!(back.meta("pool"), None);
    assert!(back.body.starts_with(b"Subject: bad value\r\nX-Seen"));
}

#[test]
fn a_session_keeps_one_connection_object_that_follows_it() {
    // The script keeps the first connection object it sees; later hooks of the
    // same session get that object, with what EHLO, STARTTLS and AUTH changed.
    let source = r#"
        first = nil
        local function check(conn, helo, tls, user)
          if first == nil then first = conn end
          if not rawequal(first, conn) then error("another object") end
          if conn:get_meta("ehlo_domain") ~= helo or conn:get_meta("tls") ~= tls
             or conn:get_meta("authn_id") ~= user then
            error("stale: " .. tostring(conn:get_meta("ehlo_domain")))
          end
        end
        gannet.on("smtp_server_connection_accepted", function(conn) check(conn, nil, false, nil) end)
        gannet.on("smtp_server_ehlo", function(domain, conn) check(conn, domain, false, nil) end)
        gannet.on("smtp_server_mail_from", function(sender, conn)
          check(conn, "mx.example.net", true, "ann")
          if sender.email ~= "s@a.test" or sender.user ~= "s" or sender.domain ~= "a.test"
             or tostring(sender) ~= "s@a.test" then error("address") end
        end)
        gannet.on("smtp_server_mail_rcpt_to", function(rcpt, conn)
          if tostring(rcpt) ~= "" or rcpt.domain ~= "" then error("null address") end
        end)
        gannet.on("smtp_server_message_received", function(msg, conn)
          check(conn, "mx.example.net", true, "ann")
          local all = msg:recipients()
          if #all ~= 2 or all[2].domain ~= "c.test" or msg:sender().user ~= "s" then error("recipients") end
        end)
    "#;
    let script = load(source);
    let slot = ConnSlot::default();
    let mut c = Client {
        helo: None,
        tls: false,
        ..client()
    };
    assert_eq!(script.connection_accepted(&slot, &c), Outcome::Continue);
    c.helo = Some("mx.example.net");
    assert_eq!(script.ehlo(&slot, &c), Outcome::Continue);
    c.tls = true;
    c.auth_user = Some("ann");
    assert_eq!(script.mail_from(&slot, &c, "s@a.test"), Outcome::Continue);
    assert_eq!(script.rcpt_to(&slot, &c, ""), Outcome::Continue);
    let message = super::Message {
        sender: "s@a.test".into(),
        recipients: vec!["r@b.test".into(), "q@c.test".into()],
        body: b"Subject: hi\r\n\r\nbody\r\n".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        script
            .smtp_message(&[Hook::MessageReceived], &slot, &c, message)
            .0,
        Outcome::Continue
    );
    // Another VM (a script reloaded) makes its own object for the session: the
    // slot's object belongs to the first.
    let reloaded = load(source);
    match reloaded.mail_from(&slot, &c, "s@a.test") {
        Outcome::Continue => {}
        other => panic!("{other:?}"),
    }
    // ... and keeps using it after.
    assert_eq!(reloaded.mail_from(&slot, &c, "s@a.test"), Outcome::Continue);
}

#[test]
fn metadata_of_any_key_and_imported_x_headers() {
    let script = load(
        r#"
        gannet.on("http_message_generated", function(msg)
          msg:import_x_headers()
          msg:import_x_headers({ "subject" })
          if msg:get_meta("x_campaign_id") ~= "12345" or msg:get_meta("x_mailer") ~= "foo bar"
             or msg:get_meta("subject") ~= "the subject" then error("imported") end
          -- gannet's own keys are read, not changed
          if msg:get_meta("transmission_id") ~= "t-1" then error("read-only key unreadable") end
          local ok, err = pcall(function() msg:set_meta("transmission_id", "x") end)
          if ok or not string.find(tostring(err), "cannot be changed", 1, true) then error("read-only key set") end
          msg:set_meta("routing_domain", "Relay.Example")
          msg:set_meta("campaign", msg:get_meta("x_campaign_id"))
          msg:set_meta("x_mailer", nil)
          for _, bad in ipairs({ "not a domain", "-edge.example", "[10.0.0.1]", "b\195\188cher.example", "a..b" }) do
            local ok, err = pcall(function() msg:set_meta("routing_domain", bad) end)
            if ok then error("a bad routing domain was taken: " .. bad) end
          end
          local ok, err = pcall(function() msg:set_meta("note", "two\nlines") end)
          if ok then error("a value with a line break was taken") end
          msg:set_meta("note", "kept with the message")
        end)
        "#,
    );
    let message = super::Message {
        sender: "s@a.test".into(),
        recipients: vec!["r@b.test".into()],
        meta: vec![("transmission_id".into(), "t-1".into())],
        body: b"X-Campaign-ID: 12345\r\nX-Mailer: foo\r\n bar\r\nSubject: the subject\r\n\r\nX-Not: body\r\n"
            .to_vec(),
    };
    let (outcome, back) = script.http_message_generated(message);
    assert_eq!(outcome, Outcome::Continue);
    assert_eq!(back.meta("routing_domain"), Some("relay.example"));
    assert_eq!(back.meta("campaign"), Some("12345"));
    assert_eq!(back.meta("x_mailer"), None);
    assert_eq!(back.meta("x_not"), None, "the body's lines are not headers");
    assert_eq!(back.meta("note"), Some("kept with the message"));
    assert_eq!(back.meta("transmission_id"), Some("t-1"));
}

#[test]
fn smtp_server_data_and_message_received_are_separate_hooks() {
    let script = load(
        r#"
        gannet.on("smtp_server_data", function(msg, conn)
          if conn:get_meta("tls") ~= true then error("no connection") end
          msg:set_meta("seen_by", "data")
        end)
        gannet.on("smtp_server_message_received", function(msg, conn)
          msg:set_meta("seen_by", msg:get_meta("seen_by") .. "+received")
        end)
        "#,
    );
    let slot = ConnSlot::default();
    let (outcome, message) = script.smtp_message(
        &[Hook::Data, Hook::MessageReceived],
        &slot,
        &client(),
        super::Message::default(),
    );
    assert_eq!(outcome, Outcome::Continue);
    assert_eq!(message.meta("seen_by"), Some("data+received"));
    // A refusal stops the hooks after it.
    let refusing = load(
        r#"
        gannet.on("smtp_server_data", function(msg) gannet.reject(550, "no") end)
        gannet.on("smtp_server_message_received", function(msg) msg:set_meta("reached", "yes") end)
        "#,
    );
    let (outcome, message) = refusing.smtp_message(
        &[Hook::Data, Hook::MessageReceived],
        &slot,
        &client(),
        super::Message::default(),
    );
    assert!(matches!(outcome, Outcome::Reject(_)), "{outcome:?}");
    assert_eq!(message.meta("reached"), None);
    assert!(!script.has(Hook::HttpMessageGenerated));
}

#[test]
fn queue_configs_are_checked_and_given_per_queue() {
    use super::QueueConfig;
    let script = load(
        r#"
        gannet.on("get_queue_config", function(domain, tenant, campaign, routing_domain)
          if domain == "slow.test" then
            return kumo.make_queue_config { retry_interval = "10m", max_age = 3600 }
          end
          if tenant == "acme" and campaign == nil and routing_domain == "relay.test" then
            return { max_retry_interval = "2 days" }
          end
          if domain == "pool.test" then return { egress_pool = "warm" } end
          if domain == "text.test" then return "ten minutes" end
          if domain == "zero.test" then return gannet.make_queue_config { max_age = 0 } end
        end)
        "#,
    );
    assert_eq!(
        script.queue_config("slow.test", None, None, None),
        Ok(Some(QueueConfig {
            retry_interval_s: Some(600),
            max_retry_interval_s: None,
            max_age_s: Some(3600),
        }))
    );
    assert_eq!(
        script.queue_config("d.test", Some("acme"), None, Some("relay.test")),
        Ok(Some(QueueConfig {
            max_retry_interval_s: Some(172_800),
            ..Default::default()
        }))
    );
    assert_eq!(
        script.queue_config("other.test", None, None, None),
        Ok(None)
    );
    let err = script
        .queue_config("pool.test", None, None, None)
        .unwrap_err();
    assert!(
        err.starts_with("get_queue_config:") && err.contains("no setting \"egress_pool\""),
        "{err}"
    );
    let err = script
        .queue_config("text.test", None, None, None)
        .unwrap_err();
    assert!(err.contains("returned a string, not a table"), "{err}");
    let err = script
        .queue_config("zero.test", None, None, None)
        .unwrap_err();
    assert!(
        err.contains("max_age is a duration from 1 second to a year"),
        "{err}"
    );
    // No hook: nothing to give, nothing asked.
    assert_eq!(
        load("").queue_config("slow.test", None, None, None),
        Ok(None)
    );
}

#[test]
fn egress_paths_take_the_configurations_shaping_keys() {
    let script = load(
        r#"
        gannet.on("get_egress_path_config", function(routing_domain, egress_source, site_name)
          if routing_domain == "shaped.test" and egress_source == "default" then
            return kumo.make_egress_path {
              connection_limit = 3, max_message_rate = "50/s", max_deliveries_per_connection = 7,
            }
          end
          if routing_domain == "typo.test" then return { conection_limit = 3 } end
          if routing_domain == "zero.test" then return { connection_limit = 0 } end
        end)
        "#,
    );
    let knobs = script
        .egress_path_config("shaped.test", "default", "mx.shaped.test")
        .unwrap()
        .unwrap();
    assert_eq!(knobs.connection_limit.map(|b| b.get()), Some(3));
    assert_eq!(
        knobs.max_deliveries_per_connection.map(|b| b.get()),
        Some(7)
    );
    assert!(knobs.max_message_rate.is_some());
    assert_eq!(
        script.egress_path_config("other.test", "default", "mx"),
        Ok(None)
    );
    let err = script
        .egress_path_config("typo.test", "default", "mx")
        .unwrap_err();
    assert!(
        err.starts_with("get_egress_path_config:") && err.contains("conection_limit"),
        "{err}"
    );
    let err = script
        .egress_path_config("zero.test", "default", "mx")
        .unwrap_err();
    assert!(
        err.contains("connection_limit") || err.contains("1"),
        "{err}"
    );
}

#[test]
fn log_records_are_asked_about_with_kumomtas_message_object() {
    let delivery = br#"{"type":"delivery","timestamp_ms":1,"message_id":"m1","tenant":"acme","campaign_id":"spring","ip_pool":"shared","queue":"spring:acme@example.com","rcpt_to":"ann@example.com","response":"250 ok"}"#;
    let bounce = br#"{"type":"bounce","timestamp_ms":2,"message_id":"m2","tenant":"quiet","queue":"example.com","rcpt_to":"bob@example.com"}"#;
    // No hook: every event goes.
    let none = load("");
    assert!(!none.has(Hook::LogRecord));
    assert_eq!(
        none.should_enqueue_log_record(b"not json", "webhook-1"),
        Ok(true)
    );

    let script = load(
        r#"
        kumo.on("should_enqueue_log_record", function(msg, hook_name)
          local record = msg:get_meta("log_record")
          if hook_name ~= "webhook-1" then error("hook name " .. tostring(hook_name)) end
          if msg:get_meta("tenant") == "quiet" then return false end
          if record.type == "delivery" then
            if msg:get_meta("campaign") ~= "spring" or msg:get_meta("pool") ~= "shared"
               or record.message_id ~= "m1" or msg:get_meta("nothing") ~= nil then
              error("fields wrong")
            end
            msg:set_meta("queue", "webhook")
            return true
          end
        end)
        "#,
    );
    assert!(script.has(Hook::LogRecord));
    assert_eq!(
        script.should_enqueue_log_record(delivery, "webhook-1"),
        Ok(true)
    );
    assert_eq!(
        script.should_enqueue_log_record(bounce, "webhook-1"),
        Ok(false)
    );
    // Returning nothing is no, as in KumoMTA.
    let other = br#"{"type":"transient_failure","tenant":"acme"}"#;
    assert_eq!(
        script.should_enqueue_log_record(other, "webhook-1"),
        Ok(false)
    );
    let err = script
        .should_enqueue_log_record(delivery, "amqp-x")
        .unwrap_err();
    assert!(
        err.starts_with("should_enqueue_log_record:") && err.contains("hook name amqp-x"),
        "{err}"
    );
    let err = script
        .should_enqueue_log_record(b"{\"type\":", "webhook-1")
        .unwrap_err();
    assert!(err.contains("not JSON"), "{err}");

    // Metadata other than `queue` is read-only; a loop runs out of budget.
    let setter = load(
        r#"gannet.on("should_enqueue_log_record", function(msg) msg:set_meta("tenant", "x") return true end)"#,
    );
    let err = setter
        .should_enqueue_log_record(delivery, "webhook-1")
        .unwrap_err();
    assert!(err.contains("read-only"), "{err}");
    let looping =
        load(r#"gannet.on("should_enqueue_log_record", function() while true do end end)"#);
    let err = looping
        .should_enqueue_log_record(delivery, "webhook-1")
        .unwrap_err();
    assert!(err.contains("instruction budget"), "{err}");
}
