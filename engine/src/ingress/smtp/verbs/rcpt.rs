//! RCPT TO (RFC 5321 4.1.1.3): relay control, the recipient limit and the rcpt_to
//! policy phase, with the DSN parameters NOTIFY and ORCPT (RFC 3461).

use super::super::session::Session;
use super::Next;
use super::mail::strip_prefix_ci;
use crate::metrics::ShardMetrics;
use crate::policy::Verdict;
use gannet_core::address::{parse_params, parse_path, split_path};
use gannet_core::dsn;
use gannet_core::reply::{self};

pub(super) fn apply(session: &mut Session, args: &str) -> Next {
    let next = check(session, args);
    if let Next::Reply(reply) = &next
        && !reply.is_positive()
    {
        ShardMetrics::add(&session.shard.metrics.smtp_recipients_rejected_total, 1);
    }
    next
}

fn check(session: &mut Session, args: &str) -> Next {
    let Some(tx) = &session.tx else {
        return Next::Reply(reply::NEED_MAIL);
    };
    let Some(rest) = strip_prefix_ci(args, "TO:") else {
        return Next::Reply(reply::SYNTAX);
    };
    let (path, params) = match split_path(rest) {
        Ok(parts) => parts,
        Err(reply) => return Next::Reply(reply),
    };
    let recipient = match parse_path(path, false) {
        Ok(recipient) => recipient,
        Err(reply) => return Next::Reply(reply),
    };
    let params = match parse_params(params) {
        Ok(params) => params,
        Err(reply) => return Next::Reply(reply),
    };
    if !params.is_empty() && !session.esmtp {
        return Next::Reply(reply::BAD_PARAM);
    }
    let mut rcpt_dsn = dsn::RcptDsn::default();
    for (key, value) in &params {
        match (key.as_str(), value) {
            ("NOTIFY", Some(_)) if rcpt_dsn.notify.is_some() => {
                return Next::Reply(dsn::DUPLICATE_PARAM);
            }
            ("ORCPT", Some(_)) if rcpt_dsn.orcpt.is_some() => {
                return Next::Reply(dsn::DUPLICATE_PARAM);
            }
            ("NOTIFY", Some(v)) => match dsn::Notify::parse(v) {
                Ok(n) => rcpt_dsn.notify = Some(n),
                Err(reply) => return Next::Reply(reply),
            },
            ("ORCPT", Some(v)) => match dsn::parse_orcpt(v) {
                Ok(o) => rcpt_dsn.orcpt = Some(o),
                Err(reply) => return Next::Reply(reply),
            },
            _ => return Next::Reply(reply::BAD_PARAM),
        }
    }
    if !recipient.is_ascii() && !tx.smtputf8 {
        return Next::Reply(reply::NEED_SMTPUTF8);
    }
    if tx.recipients.len() >= session.config().smtp.recipients_max.usize() {
        return Next::Reply(reply::TOO_MANY_RECIPIENTS);
    }
    let client = session.client();
    let verdict = session
        .shard
        .shared
        .policy
        .rcpt_to(&client, &tx.sender.text, &recipient.text);
    // The script is asked unless the rules refused; it cannot grant relaying.
    let verdict = match verdict {
        Verdict::Reject(reply) => Verdict::Reject(reply),
        other => {
            match session.script_refusal(|script, conn, client| {
                script.rcpt_to(conn, client, &recipient.text)
            }) {
                Some(reply) => Verdict::Reject(reply),
                None => other,
            }
        }
    };
    let relay_ok = match verdict {
        Verdict::Reject(reply) => {
            let sender = tx.sender.text.clone();
            session.policy_rejection("rcpt_to", Some(&sender), Some(&recipient.text), &reply);
            return Next::Reply(reply);
        }
        Verdict::Accept => true,
        // Mail to an inbound domain is feedback for gannet itself, not relayed.
        Verdict::Continue => {
            session.relay_from_network
                || session.auth_user.is_some()
                || super::super::feedback::is_inbound(&session.shard, &recipient.text)
        }
    };
    if !relay_ok {
        let sender = tx.sender.text.clone();
        session.policy_rejection(
            "rcpt_to",
            Some(&sender),
            Some(&recipient.text),
            &reply::RELAY_DENIED,
        );
        return Next::Reply(reply::RELAY_DENIED);
    }
    let tx = session.tx.as_mut().expect("checked above");
    tx.recipients.push(recipient.text);
    tx.dsn_rcpts.push(rcpt_dsn);
    Next::Reply(reply::RECIPIENT_OK)
}
