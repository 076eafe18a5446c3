//! NOOP (RFC 5321 4.1.1.9): a parameter, if any, is ignored.

use super::super::session::Session;
use super::Next;
use gannet_core::reply;

pub(super) fn apply(_session: &mut Session, _args: &str) -> Next {
    Next::Reply(reply::OK)
}
