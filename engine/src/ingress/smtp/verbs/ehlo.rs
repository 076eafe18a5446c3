//! EHLO and HELO (RFC 5321 4.1.1.1): greet, reset any transaction, and (EHLO) list
//! the extensions this session offers.

use std::fmt::Write as _;

use super::super::session::Session;
use super::Next;
use crate::policy::Verdict;
use gannet_core::reply::Reply;

pub(super) fn apply(session: &mut Session, args: &str, extended: bool) -> Next {
    let name = args.trim();
    if name.is_empty() || name.len() > 255 || name.bytes().any(|b| !(33..127).contains(&b)) {
        return Next::Reply(Reply::fixed(
            501,
            "5.5.4",
            "EHLO/HELO needs a host name or address literal",
        ));
    }
    session.tx = None;
    session.helo = Some(name.to_string());
    session.esmtp = extended;
    let refusal = match session.shard.shared.policy.ehlo(&session.client()) {
        Verdict::Reject(reply) => Some(reply),
        _ => session.script_refusal(|script, conn, client| script.ehlo(conn, client)),
    };
    if let Some(reply) = refusal {
        session.helo = None;
        session.policy_rejection("ehlo", None, None, &reply);
        return Next::Reply(reply);
    }
    let hostname = &session.config().server.hostname;
    if !extended {
        return Next::Reply(Reply::new(250, "", format!("{hostname} greets {name}")));
    }
    let smtp = &session.config().smtp;
    let mut text = format!(
        "{hostname} greets {name}\nPIPELINING\nSIZE {}\n8BITMIME\nSMTPUTF8\nENHANCEDSTATUSCODES\nCHUNKING\nDSN",
        smtp.message_bytes_max.get()
    );
    if session.tls.is_none() && session.shard.shared.tls.is_some() {
        text.push_str("\nSTARTTLS");
    }
    if session.auth_offered() {
        let _ = write!(text, "\nAUTH PLAIN LOGIN");
    }
    Next::Reply(Reply::new(250, "", text))
}
