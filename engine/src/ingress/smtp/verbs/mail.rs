//! MAIL FROM (RFC 5321 4.1.1.2) with the parameters this server offers: SIZE
//! (RFC 1870), BODY=7BIT/8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), RET and ENVID
//! (RFC 3461, DSN) and AUTH= (RFC 4954, accepted and ignored).

use super::super::session::{Session, Transaction};
use super::Next;
use crate::policy::Verdict;
use gannet_core::address::{parse_params, parse_path, split_path};
use gannet_core::dsn;
use gannet_core::reply::{self, Reply};

pub(super) fn apply(session: &mut Session, args: &str) -> Next {
    if session.helo.is_none() {
        return Next::Reply(reply::NEED_HELO);
    }
    if session.tx.is_some() {
        return Next::Reply(reply::NESTED_MAIL);
    }
    if !session.shard.spool.is_healthy() {
        return Next::Close(reply::SPOOL_UNHEALTHY);
    }
    let Some(rest) = strip_prefix_ci(args, "FROM:") else {
        return Next::Reply(reply::SYNTAX);
    };
    let (path, params) = match split_path(rest) {
        Ok(parts) => parts,
        Err(reply) => return Next::Reply(reply),
    };
    let sender = match parse_path(path, true) {
        Ok(sender) => sender,
        Err(reply) => return Next::Reply(reply),
    };
    let params = match parse_params(params) {
        Ok(params) => params,
        Err(reply) => return Next::Reply(reply),
    };
    if !params.is_empty() && !session.esmtp {
        return Next::Reply(reply::BAD_PARAM);
    }
    let size_max = session.config().smtp.message_bytes_max.get();
    let mut smtputf8 = false;
    let mut declared_size = None;
    let mut ret = None;
    let mut envid = None;
    for (key, value) in &params {
        match (key.as_str(), value) {
            ("SIZE", Some(v)) => match v.parse::<u64>() {
                Ok(n) if n > size_max => {
                    return Next::Reply(Reply::fixed(
                        552,
                        "5.3.4",
                        "message size exceeds fixed maximum message size",
                    ));
                }
                Ok(n) => declared_size = Some(n),
                Err(_) => return Next::Reply(reply::SYNTAX),
            },
            ("BODY", Some(v))
                if v.eq_ignore_ascii_case("7BIT") || v.eq_ignore_ascii_case("8BITMIME") => {}
            ("SMTPUTF8", None) => smtputf8 = true,
            ("AUTH", Some(_)) => {}
            ("RET", Some(_)) | ("ENVID", Some(_))
                if (key == "RET" && ret.is_some()) || (key == "ENVID" && envid.is_some()) =>
            {
                return Next::Reply(dsn::DUPLICATE_PARAM);
            }
            ("RET", Some(v)) => match dsn::Ret::parse(v) {
                Ok(r) => ret = Some(r),
                Err(reply) => return Next::Reply(reply),
            },
            ("ENVID", Some(v)) => match dsn::xtext_decode(v) {
                // RFC 3461 4.4: at most 100 characters, printable US-ASCII.
                Ok(id) if id.len() <= 100 && id.bytes().all(|b| (32..127).contains(&b)) => {
                    envid = Some(id)
                }
                Ok(_) => {
                    return Next::Reply(Reply::fixed(
                        501,
                        "5.5.4",
                        "ENVID must be at most 100 printable characters",
                    ));
                }
                Err(reply) => return Next::Reply(reply),
            },
            _ => return Next::Reply(reply::BAD_PARAM),
        }
    }
    if !sender.is_ascii() && !smtputf8 {
        return Next::Reply(reply::NEED_SMTPUTF8);
    }
    let refusal = match session
        .shard
        .shared
        .policy
        .mail_from(&session.client(), &sender.text)
    {
        Verdict::Reject(reply) => Some(reply),
        _ => session
            .script_refusal(|script, conn, client| script.mail_from(conn, client, &sender.text)),
    };
    if let Some(reply) = refusal {
        session.policy_rejection("mail_from", Some(&sender.text), None, &reply);
        return Next::Reply(reply);
    }
    let mut tx = Transaction::new(sender, smtputf8, declared_size);
    tx.dsn_ret = ret;
    tx.dsn_envid = envid;
    session.tx = Some(tx);
    Next::Reply(reply::SENDER_OK)
}

/// `args` without a case-insensitive `prefix`.
pub(super) fn strip_prefix_ci<'a>(args: &'a str, prefix: &str) -> Option<&'a str> {
    let head = args.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &args[prefix.len()..])
}
