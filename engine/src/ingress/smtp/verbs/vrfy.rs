//! VRFY and EXPN: disabled, as on every MTA that does not want to disclose mailboxes.
//! VRFY answers 252 (RFC 5321 3.5.3: "cannot verify, but will accept"), EXPN 502.

use super::super::session::Session;
use super::Next;
use gannet_core::reply::{self, Reply};

pub(super) fn apply(_session: &mut Session, args: &str, expn: bool) -> Next {
    if args.trim().is_empty() {
        return Next::Reply(reply::SYNTAX);
    }
    if expn {
        return Next::Reply(Reply::fixed(502, "5.5.1", "EXPN is disabled"));
    }
    Next::Reply(reply::VRFY_DISABLED)
}
