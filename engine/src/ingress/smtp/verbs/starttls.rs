//! STARTTLS (RFC 3207). The session discards everything it knew from the client once
//! the handshake is done; plaintext pipelined behind the command is an attack
//! (CVE-2011-0411) and drops the connection (checked by the session, which owns the
//! input buffer).

use super::super::session::Session;
use super::{Next, no_args};
use gannet_core::reply;

pub(super) fn apply(session: &mut Session, args: &str) -> Next {
    if let Err(reply) = no_args(args) {
        return Next::Reply(reply);
    }
    if session.tls.is_some() {
        return Next::Reply(reply::ALREADY_TLS);
    }
    if session.shard.shared.tls.is_none() {
        return Next::Reply(reply::TLS_UNAVAILABLE);
    }
    if session.tx.is_some() {
        return Next::Reply(reply::NESTED_MAIL);
    }
    Next::StartTls
}
