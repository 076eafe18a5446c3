//! One module per SMTP verb. A verb parses its arguments, checks the session's state,
//! consults policy and returns what the session must do next ([`Next`]); verbs do no
//! I/O themselves, so the protocol logic can be read (and tested) apart from sockets.

mod auth;
mod bdat;
mod data;
mod ehlo;
mod help;
mod mail;
mod noop;
mod quit;
mod rcpt;
mod rset;
mod starttls;
mod vrfy;

pub use auth::{Mechanism, decode_plain as auth_plain, decode_response as auth_decode};

use super::session::Session;
use gannet_core::reply::{self, Reply};

/// What the session does after a command.
#[derive(Debug)]
pub enum Next {
    /// Send this reply and read the next command.
    Reply(Reply),
    /// Send this reply and close the connection.
    Close(Reply),
    /// Send 354 and read the message (DATA).
    Data,
    /// Read a BDAT chunk of `size` octets into the transaction.
    Bdat { size: usize, last: bool },
    /// Read and discard a BDAT chunk of `size` octets, then send `reply`.
    BdatDiscard { size: usize, reply: Reply },
    /// Send 220 and start TLS.
    StartTls,
    /// Run an AUTH exchange; `initial` is the initial response, if given.
    Auth {
        mechanism: Mechanism,
        initial: Option<String>,
    },
}

/// Replies that mean "the client sent something wrong" (counted against
/// `bad_commands_max`).
pub fn is_bad_command(reply: &Reply) -> bool {
    matches!(reply.code, 500..=504 | 555)
}

/// Runs one command line (CRLF removed).
pub fn dispatch(session: &mut Session, line: &str) -> Next {
    let (verb, args) = match line.split_once(' ') {
        Some((verb, args)) => (verb, args),
        None => (line, ""),
    };
    let is = |name: &str| verb.eq_ignore_ascii_case(name);
    if session.in_bdat() && !(is("BDAT") || is("RSET") || is("QUIT") || is("NOOP")) {
        return Next::Reply(reply::NOT_DURING_BDAT);
    }
    if is("EHLO") {
        ehlo::apply(session, args, true)
    } else if is("HELO") {
        ehlo::apply(session, args, false)
    } else if is("MAIL") {
        mail::apply(session, args)
    } else if is("RCPT") {
        rcpt::apply(session, args)
    } else if is("DATA") {
        data::apply(session, args)
    } else if is("BDAT") {
        bdat::apply(session, args)
    } else if is("RSET") {
        rset::apply(session, args)
    } else if is("NOOP") {
        noop::apply(session, args)
    } else if is("QUIT") {
        quit::apply(session, args)
    } else if is("VRFY") || is("EXPN") {
        vrfy::apply(session, args, is("EXPN"))
    } else if is("HELP") {
        help::apply(session, args)
    } else if is("STARTTLS") {
        starttls::apply(session, args)
    } else if is("AUTH") {
        auth::apply(session, args)
    } else {
        Next::Reply(reply::UNKNOWN_COMMAND)
    }
}

/// Rejects arguments on verbs that take none.
fn no_args(args: &str) -> Result<(), Reply> {
    if args.trim().is_empty() {
        Ok(())
    } else {
        Err(reply::SYNTAX)
    }
}
