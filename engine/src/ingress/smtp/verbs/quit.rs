//! QUIT (RFC 5321 4.1.1.10): 221 and close.

use super::super::session::Session;
use super::{Next, no_args};
use gannet_core::reply;

pub(super) fn apply(_session: &mut Session, args: &str) -> Next {
    match no_args(args) {
        Ok(()) => Next::Close(reply::BYE),
        Err(reply) => Next::Reply(reply),
    }
}
