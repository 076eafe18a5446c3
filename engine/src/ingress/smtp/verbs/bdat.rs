//! BDAT (RFC 3030 CHUNKING): `BDAT <size> [LAST]`. The chunk's octets always follow
//! the command, so even a refused BDAT must read (and discard) them to stay in step.

use super::super::session::Session;
use super::Next;
use gannet_core::reply::{self, Reply};

pub(super) fn apply(session: &mut Session, args: &str) -> Next {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let size = words
        .next()
        .filter(|w| w.len() <= 19 && w.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|w| w.parse::<usize>().ok());
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return bad_syntax(),
    };
    let Some(size) = size else {
        return bad_syntax();
    };
    if words.next().is_some() {
        return bad_syntax();
    }
    let refuse = match &session.tx {
        None => Some(reply::NEED_MAIL),
        Some(tx) if tx.recipients.is_empty() => {
            Some(Reply::fixed(554, "5.5.1", "no valid recipients"))
        }
        Some(_) => None,
    };
    match refuse {
        Some(reply) => Next::BdatDiscard { size, reply },
        None => Next::Bdat { size, last },
    }
}

/// Without a valid size the chunk boundary is unknown: the rest of the stream cannot
/// be interpreted safely, so the session ends.
fn bad_syntax() -> Next {
    Next::Close(Reply::fixed(
        501,
        "5.5.4",
        "BDAT needs a chunk size and optionally LAST; closing connection",
    ))
}
