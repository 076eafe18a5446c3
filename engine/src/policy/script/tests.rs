//! The script VM on its own: loading, hooks, rejections, failures, the budget.

use std::net::{IpAddr, Ipv4Addr};

use super::{Hook, Outcome, Script, failure_reply};
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
        script.rcpt_to(&client(), "ann@ok.example"),
        Outcome::Continue
    );
    assert_eq!(
        reply_text(script.rcpt_to(&client(), "bob@blocked.example")),
        "550 5.7.1 no mail for bob at bob@blocked.example"
    );
    // Hooks not registered cost nothing and say nothing.
    assert_eq!(script.mail_from(&client(), "x@y"), Outcome::Continue);
    assert_eq!(script.connection_accepted(&client()), Outcome::Continue);
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
    assert_eq!(reply_text(script.ehlo(&c)), "421 4.7.1 go away");
    assert_eq!(script.connection_accepted(&c), Outcome::Continue);
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
    match script.mail_from(&client(), "a@nil.example") {
        Outcome::Failed(why) => assert!(
            why.starts_with("smtp_server_mail_from: policy.lua:2:") && why.contains("nil"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    match script.mail_from(&client(), "a@code.example") {
        Outcome::Failed(why) => assert!(why.contains("250 is not a 4xx or 5xx"), "{why}"),
        other => panic!("{other:?}"),
    }
    // An enhanced code of the wrong class is text; line breaks become spaces.
    assert_eq!(
        reply_text(script.mail_from(&client(), "a@other.example")),
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
    match script.rcpt_to(&client(), "a@loop.example") {
        Outcome::Failed(why) => assert!(
            why.contains("instruction budget of 100000 exceeded"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    // The budget is per call: a call under it runs after one that ran out.
    for _ in 0..50 {
        assert_eq!(script.rcpt_to(&client(), "a@ok.example"), Outcome::Continue);
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
            script.connection_accepted(&client()),
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
    let (outcome, back) = script.message_received(&client(), message.clone());
    assert_eq!(outcome, Outcome::Continue);
    assert_eq!(back.tenant.as_deref(), Some("t1"));
    assert_eq!(
        back.body,
        b"Subject: hi\r\nX-Seen: r@b.test\r\n\r\nbody\r\n"
    );
    // The script's reference is to an emptied message now.
    let (outcome, _) = script.message_received(&client(), message.clone());
    assert_eq!(outcome, Outcome::Continue);
    let mut bad = message;
    bad.body = b"Subject: bad value\r\n\r\n".to_vec();
    let (outcome, back) = script.message_received(&client(), bad);
    match outcome {
        Outcome::Failed(why) => assert!(why.contains("without spaces"), "{why}"),
        other => panic!("{other:?}"),
    }
    // What the hook did before it failed comes back with the message.
    assert_eq!(back.pool, None);
    assert!(back.body.starts_with(b"Subject: bad value\r\nX-Seen"));
}
