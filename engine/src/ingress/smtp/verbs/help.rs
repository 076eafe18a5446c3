//! HELP (RFC 5321 4.1.1.8).

use super::super::session::Session;
use super::Next;
use gannet_core::reply::Reply;

pub(super) fn apply(_session: &mut Session, _args: &str) -> Next {
    Next::Reply(Reply::fixed(
        214,
        "2.0.0",
        "gannet; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH\n\
         see RFC 5321",
    ))
}
