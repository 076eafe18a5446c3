//! RSET (RFC 5321 4.1.1.5): abandon the transaction, keep the session.

use super::super::session::Session;
use super::{Next, no_args};
use gannet_core::reply;

pub(super) fn apply(session: &mut Session, args: &str) -> Next {
    if let Err(reply) = no_args(args) {
        return Next::Reply(reply);
    }
    session.tx = None;
    Next::Reply(reply::RESET_OK)
}
