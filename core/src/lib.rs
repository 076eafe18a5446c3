//! gannet's leaf layer: the types and rules every other layer shares, with no
//! executor and no sockets (its only I/O is reading the config file, and the host
//! name for the default `server.hostname`). The engine and the benchmarks import it;
//! it imports no gannet crate, and Cargo keeps it that way.
//!
//! - `config`: the configuration's types, defaults and validation (errors name the
//!   key and its line);
//! - `address`: SMTP paths (RFC 5321/6531 mailboxes) and MAIL/RCPT parameters;
//! - `auth`: SMTP AUTH password hashes and HTTP API keys;
//! - `handoff`: a part handed to the shard that owns its site, and the report back;
//! - `message`: a received message's header checks, Received and Message-ID fields,
//!   and the headers lifted into metadata;
//! - `reply`: SMTP replies we send and responses we receive, with enhanced status
//!   codes;
//! - `shaping`: traffic shaping as data — each ready queue's knobs, GCRA throttles,
//!   suspensions;
//! - `clock`: the wall clock in the units the queues use.

pub mod address;
pub mod auth;
pub mod clock;
pub mod config;
pub mod handoff;
pub mod message;
pub mod reply;
pub mod shaping;
