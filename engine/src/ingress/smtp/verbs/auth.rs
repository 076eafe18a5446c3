//! AUTH (RFC 4954) with the PLAIN (RFC 4616) and LOGIN mechanisms. This module checks
//! whether AUTH may start; the session runs the challenge/response exchange with
//! [`decode_plain`] and friends, since it needs to read lines.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::super::session::Session;
use super::Next;
use gannet_core::reply::{self, Reply};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

pub(super) fn apply(session: &mut Session, args: &str) -> Next {
    if session.helo.is_none() || !session.esmtp {
        return Next::Reply(reply::NEED_HELO);
    }
    if session.shard.shared.credentials.is_empty() {
        return Next::Reply(reply::AUTH_UNAVAILABLE);
    }
    if session.auth_user.is_some() {
        return Next::Reply(reply::ALREADY_AUTH);
    }
    if session.tx.is_some() {
        return Next::Reply(Reply::fixed(
            503,
            "5.5.1",
            "AUTH is not permitted during a mail transaction",
        ));
    }
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let mechanism = match words.next() {
        Some(m) if m.eq_ignore_ascii_case("PLAIN") => Mechanism::Plain,
        Some(m) if m.eq_ignore_ascii_case("LOGIN") => Mechanism::Login,
        Some(_) => return Next::Reply(reply::AUTH_BAD_MECHANISM),
        None => return Next::Reply(reply::SYNTAX),
    };
    if !session.auth_offered() {
        return Next::Reply(reply::AUTH_NEEDS_TLS);
    }
    let initial = words.next().map(str::to_string);
    if words.next().is_some() {
        return Next::Reply(reply::SYNTAX);
    }
    Next::Auth { mechanism, initial }
}

/// Decodes one base64 client response; `*` cancels the exchange (RFC 4954 4).
pub fn decode_response(line: &str) -> Result<Vec<u8>, Reply> {
    let line = line.trim();
    if line == "*" {
        return Err(reply::AUTH_CANCELLED);
    }
    if line == "=" {
        return Ok(Vec::new());
    }
    B64.decode(line)
        .map_err(|_| Reply::fixed(501, "5.5.2", "cannot decode base64 response"))
}

/// Splits a PLAIN response `authzid NUL authcid NUL password` into (user, password).
/// An authorization identity other than the user itself is refused.
pub fn decode_plain(response: &[u8]) -> Result<(String, Vec<u8>), Reply> {
    let mut parts = response.split(|b| *b == 0);
    let (Some(authz), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Reply::fixed(501, "5.5.2", "malformed PLAIN response"));
    };
    let user = String::from_utf8(user.to_vec())
        .map_err(|_| Reply::fixed(501, "5.5.2", "user name is not UTF-8"))?;
    if !authz.is_empty() && authz != user.as_bytes() {
        return Err(reply::AUTH_FAILED);
    }
    Ok((user, password.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_responses() {
        assert_eq!(
            decode_plain(b"\0app\0pw").unwrap(),
            ("app".to_string(), b"pw".to_vec())
        );
        assert_eq!(decode_plain(b"app\0app\0pw").unwrap().0, "app");
        assert_eq!(decode_plain(b"other\0app\0pw").unwrap_err().code, 535);
        assert_eq!(decode_plain(b"app\0pw").unwrap_err().code, 501);
        assert_eq!(decode_plain(b"\0a\0b\0c").unwrap_err().code, 501);
        assert_eq!(decode_response("*").unwrap_err().code, 501);
        assert_eq!(decode_response("!!").unwrap_err().code, 501);
        assert_eq!(decode_response("AGFwcABwdw==").unwrap(), b"\0app\0pw");
    }
}
