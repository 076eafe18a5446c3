//! gannet's leaf layer: the types and rules every other layer shares, with no
//! executor and no sockets (its only I/O is reading the config file, and the host
//! name for the default `server.hostname`). The spool, the engine and the benchmarks
//! import it; it imports no gannet crate, and Cargo keeps it that way.
//!
//! - `config`: the configuration's types, defaults and validation (errors name the
//!   key and its line);
//! - `address`: SMTP paths (RFC 5321/6531 mailboxes) and MAIL/RCPT parameters;
//! - `auth`: SMTP AUTH password hashes and HTTP API keys;
//! - `handoff`: a part handed to the shard that owns its site, and the report back;
//! - `headers`: reading, adding and removing the header fields of a checked message;
//! - `message`: a received message's header checks, Received and Message-ID fields,
//!   and the headers lifted into metadata;
//! - `reply`: SMTP replies we send and responses we receive, with enhanced status
//!   codes;
//! - `shaping`: traffic shaping as data — each ready queue's knobs, GCRA throttles,
//!   suspensions;
//! - `id`: message ids, unique across shards, restarts and nodes, sortable by time;
//! - `queue`: the queues as data — in-memory messages and their parts, the scheduled
//!   queue (a timing wheel), the ready queues, connection health, and what an
//!   attempt's replies decide (`queue::settle`);
//! - `bounce`: the bounce class of a permanent failure;
//! - `dsn`: delivery status notifications — the DSN parameters (RFC 3461) and the
//!   report (RFC 3464);
//! - `tls_policy`: what destinations ask of delivery's TLS — MTA-STS policies, DANE
//!   TLSA records, TLS-RPT addresses — and the TLS a site's connections must use;
//! - `clock`: the wall clock in the units the queues use;
//! - `event_types`: the event types the hose's sinks subscribe to (SparkPost's).

pub mod adaptive;
pub mod address;
pub mod auth;
pub mod bounce;
pub mod clock;
pub mod config;
pub mod dsn;
pub mod event_types;
pub mod handoff;
pub mod headers;
pub mod id;
pub mod lease;
pub mod message;
pub mod queue;
pub mod reply;
pub mod shaping;
pub mod tls_policy;
pub mod warmup;
