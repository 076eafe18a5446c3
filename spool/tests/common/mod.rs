//! Helpers shared by the spool's integration tests.
#![allow(dead_code)]

use std::future::Future;

use gannet_spool::{MessageId, MessageRecord, Spool, Storage};

/// Runs `f` on a fresh glommio executor (one per test: tests run in parallel threads).
pub fn run<F, T>(f: impl FnOnce() -> F + Send + 'static) -> T
where
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spin_before_park(std::time::Duration::from_millis(0))
        .make()
        .expect("glommio executor (memlock limit?)")
        .run(f())
}

/// Spawns the spool's committer on the current executor.
pub fn start<S: Storage + 'static>(spool: &Spool<S>) {
    glommio::spawn_local(spool.clone().run_committer()).detach();
}

/// A deterministic body for `id` of `len` bytes, so that integrity can be checked
/// from the id alone. Every line names the id and its own number, so a shifted,
/// truncated or swapped region does not compare equal.
pub fn body_for(id: MessageId, len: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(len + 64);
    body.extend_from_slice(b"Subject: test\r\n\r\n");
    let mut line = 0u32;
    while body.len() < len {
        body.extend_from_slice(
            format!("{id} line {line:08} of the body, with padding\r\n").as_bytes(),
        );
        line += 1;
    }
    body.truncate(len);
    body
}

/// A message with a body derived from its id.
pub fn message(id: MessageId, body_len: usize, recipients: usize) -> MessageRecord {
    MessageRecord {
        id,
        sender: "sender@example.test".into(),
        recipients: (0..recipients)
            .map(|i| format!("rcpt{i}@example.test"))
            .collect(),
        meta: vec![
            ("tenant".into(), "acme".into()),
            ("campaign".into(), "spring".into()),
        ],
        queue: "spring:acme@example.test".into(),
        attempts: 0,
        due_unix_ms: 0,
        received_unix_ms: id.unix_ms(),
        done: vec![],
        body: body_for(id, body_len),
    }
}
