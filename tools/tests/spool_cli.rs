//! `gannet-spool` against spools written by the real spool code.

use std::path::Path;
use std::process::{Command, Output};

use gannet_spool::{
    FileStorage, MessageId, MessageRecord, Record, Spool, SpoolConfig, UpdateRecord,
};

/// Writes `count` messages to shard `shard` under `root`, updates the first, returns ids.
fn write_shard(root: &Path, shard: u16, count: usize) -> Vec<MessageId> {
    let dir = root.join(shard.to_string());
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .make()
        .unwrap()
        .run(async move {
            let (spool, _) = Spool::open(
                FileStorage::open_dir(&dir).unwrap(),
                SpoolConfig::for_shard(shard),
            )
            .unwrap();
            glommio::spawn_local(spool.clone().run_committer()).detach();
            let mut ids = Vec::new();
            for i in 0..count {
                let msg = MessageRecord {
                    id: spool.next_id(),
                    sender: if i == 1 {
                        String::new()
                    } else {
                        format!("s{i}@example.test")
                    },
                    recipients: vec![format!("r{i}@example.net"), "other@example.org".into()],
                    meta: vec![("tenant".into(), "acme".into())],
                    queue: "acme@example.net".into(),
                    attempts: 0,
                    due_unix_ms: 0,
                    received_unix_ms: 1_700_000_000_000,
                    done: vec![],
                    body: format!("Subject: message {i}\r\n\r\nHello {i}\r\n").into_bytes(),
                };
                spool.write(Record::Message(&msg)).await.unwrap();
                ids.push(msg.id);
            }
            let update = UpdateRecord {
                id: ids[0],
                attempts: 3,
                due_unix_ms: 1_800_000_000_000,
                queue: "acme@example.net".into(),
                done: vec![1],
            };
            spool.write(Record::Update(&update)).await.unwrap();
            spool.close().await;
            ids
        })
}

fn tool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gannet-spool"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn list_dump_and_verify_a_two_shard_spool() {
    let root = tempfile::tempdir().unwrap();
    let ids0 = write_shard(root.path(), 0, 3);
    let ids1 = write_shard(root.path(), 1, 2);
    let path = root.path().to_str().unwrap();

    let out = tool(&["list", path]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.ends_with("5 live messages\n"), "{text}");
    let first = text
        .lines()
        .find(|l| l.starts_with(&ids0[0].to_string()))
        .unwrap();
    assert!(
        first.contains("2027-01-15T08:00:00Z"),
        "due time shown: {first}"
    );
    assert!(
        first.contains("acme@example.net") && first.contains("s0@example.test"),
        "{first}"
    );
    let null_sender = text
        .lines()
        .find(|l| l.starts_with(&ids0[1].to_string()))
        .unwrap();
    assert!(null_sender.ends_with("<>"), "{null_sender}");

    let out = tool(&["list", "--json", path]);
    let rows: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let listed: Vec<String> = rows
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = ids0.iter().chain(&ids1).map(|i| i.to_string()).collect();
    assert_eq!(listed, want);
    assert_eq!(rows[0]["attempts"], 3);
    assert_eq!(rows[0]["recipients_pending"], 1);
    assert_eq!(rows[3]["shard"], 1);

    let out = tool(&["dump", path, &ids0[0].to_string(), "--body"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for want in [
        "shard: 0",
        "attempts: 3",
        "sender: s0@example.test",
        "recipient: r0@example.net\n",
        "recipient: other@example.org (done)",
        "meta: tenant=acme",
        "received: 2023-11-14T22:13:20Z",
        "\nSubject: message 0\r\n\r\nHello 0\r\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }

    let out = tool(&["verify", path]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("shard 1: 1 segments, 3 records, 2 live messages"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).ends_with("verify: ok\n"));
}

#[test]
fn verify_reports_corrupt_records_and_torn_tails() {
    let root = tempfile::tempdir().unwrap();
    write_shard(root.path(), 0, 3);
    let shard = root.path().join("0");
    let segment = shard.join(gannet_spool::storage::segment_file_name(1));
    let mut bytes = std::fs::read(&segment).unwrap();
    // Damage the second record's payload, then leave half a record after the last.
    let second = 64
        + bytes[64 + 8..64 + 12]
            .iter()
            .rev()
            .fold(0usize, |a, &b| a * 256 + b as usize);
    let second = 64 + (second - 64 + 24).next_multiple_of(8);
    bytes[second + 40] ^= 0xff;
    let end = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
    let end = end.next_multiple_of(8);
    bytes[end..end + 30].copy_from_slice(&[0x47; 30]);
    std::fs::write(&segment, &bytes).unwrap();

    let out = tool(&["verify", shard.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("corrupt: offset {second} length")),
        "{text}"
    );
    assert!(text.contains("record payload checksum mismatch"), "{text}");
    assert!(text.contains("torn tail: 30 bytes discarded"), "{text}");
    assert!(text.ends_with("verify: DAMAGE FOUND\n"), "{text}");
    // The other records are still listed.
    let out = tool(&["list", shard.to_str().unwrap()]);
    assert!(
        stdout(&out).ends_with("2 live messages\n"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn bad_arguments_and_a_running_daemon_get_precise_errors() {
    let root = tempfile::tempdir().unwrap();
    let ids = write_shard(root.path(), 0, 1);
    let path = root.path().to_str().unwrap();

    let out = tool(&["dump", path, "nothex"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("message id must be 32 hex digits, got \"nothex\""),
        "{}",
        stderr(&out)
    );

    let missing = MessageId {
        hi: ids[0].hi,
        lo: ids[0].lo + 1,
    };
    let out = tool(&["dump", path, &missing.to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!("no live message {missing}")),
        "{}",
        stderr(&out)
    );

    let out = tool(&["list", "/nonexistent/spool"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/spool is not a directory"),
        "{}",
        stderr(&out)
    );

    let held = FileStorage::open_dir(root.path().join("0")).unwrap();
    let out = tool(&["list", path]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is in use by another process (is gannetd running?)"),
        "{}",
        stderr(&out)
    );
    drop(held);
}
