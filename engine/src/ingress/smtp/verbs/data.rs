//! DATA (RFC 5321 4.1.1.4): the session reads the message after 354.

use super::super::session::Session;
use super::{Next, no_args};
use gannet_core::reply::{self, Reply};

pub(super) fn apply(session: &mut Session, args: &str) -> Next {
    if let Err(reply) = no_args(args) {
        return Next::Reply(reply);
    }
    match &session.tx {
        None => Next::Reply(reply::NEED_MAIL),
        Some(tx) if tx.recipients.is_empty() => {
            Next::Reply(Reply::fixed(554, "5.5.1", "no valid recipients"))
        }
        Some(_) => Next::Data,
    }
}
