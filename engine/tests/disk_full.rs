//! A full disk: gannetd's data directory on a small loop-mounted ext4 file system,
//! filled to the last block by a ballast file. SMTP gets 452 4.3.1 and HTTP 503 —
//! never a 250 or a 200 for what was not written — the daemon keeps running, and
//! acceptance resumes once the ballast is removed. Every message acknowledged is in
//! the spool at the end, and nothing refused is.
//!
//! Mounting needs root (as the whole test command does on the CI machine).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, curl};
use serde_json::json;

const KEY: &str = "gannet-disk-key-5e0c7d9b3a1f4682";

/// An ext4 file system in a file, mounted on a directory; unmounted when dropped.
struct LoopMount {
    image: tempfile::TempDir,
    at: PathBuf,
}

impl LoopMount {
    fn new(bytes: u64, at: &Path) -> LoopMount {
        let image = tempfile::tempdir().unwrap();
        let file = image.path().join("disk.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&file));
        std::fs::create_dir_all(at).unwrap();
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&file)
            .arg(at));
        LoopMount {
            image,
            at: at.to_path_buf(),
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.at).status();
        let _ = &self.image;
    }
}

fn run(command: &mut Command) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed (the disk-full test mounts a loop file system and needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fills the file system holding `path` with a ballast file, to the last byte.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(_) => break,
        }
    }
    // Whatever is left in units smaller than a chunk.
    while file.write(&chunk[..512]).is_ok_and(|n| n > 0) {
        written += 512;
    }
    let _ = file.sync_all();
    written
}

/// One SMTP transaction of about 100 KB: the final reply to the message.
fn send(daemon: &Daemon, n: usize) -> String {
    let line = format!("{}\r\n", "y".repeat(998));
    daemon.send_message(
        &format!("r{n}@d.test"),
        &format!("Subject: {n}\r\n\r\n{}", line.repeat(100)),
    )
}

#[test]
fn a_full_disk_refuses_with_4xx_and_503_and_acceptance_resumes_when_space_returns() {
    // The daemon's data directory is the mounted file system.
    let dir = tempfile::tempdir().unwrap();
    let disk = LoopMount::new(24 << 20, &dir.path().join("data"));
    let config = format!(
        "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = 2\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\n\
         [http]\nlisten = [\"127.0.0.1:0\"]\n\
         api_keys = [{{ name = \"t\", key_sha256 = \"{}\", tenant = \"acme\" }}]\n\
         [spool]\nsegment_bytes = 1048576\n[delivery]\nsuspended = true\n",
        disk.at.display(),
        gannet_core::auth::KeyDigest::of(KEY)
    );
    let mut daemon = Daemon::start_in(dir, &config);
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    let mut n = 0;
    for _ in 0..3 {
        n += 1;
        let reply = send(&daemon, n);
        let id = reply.strip_prefix("250 2.0.0 OK queued as ").expect(&reply);
        accepted.push(id.trim().to_string());
    }
    let ballast = disk.at.join("ballast");
    let filled = fill(&ballast);
    assert!(filled > 8 << 20, "the ballast took {filled} bytes");

    // Send until the disk refuses, a few times over (the segments already made take
    // what fits in them first).
    // Ten refusals in a row: each shard has its own segments, and both are full.
    let mut in_a_row = 0;
    while in_a_row < 10 {
        n += 1;
        assert!(n < 500, "the full disk never refused a message");
        let reply = send(&daemon, n);
        match reply.strip_prefix("250 2.0.0 OK queued as ") {
            Some(id) => {
                accepted.push(id.trim().to_string());
                in_a_row = 0;
            }
            None => {
                refused.push(reply);
                in_a_row += 1;
            }
        }
    }
    for reply in &refused {
        assert!(
            reply.starts_with("452 4.3.1") || reply.starts_with("451 4.3.0"),
            "{reply}"
        );
    }
    assert!(
        refused.iter().any(|r| r.starts_with("452 4.3.1")),
        "{refused:?}"
    );
    let transmission = json!({
        "recipients": [{"address": "h@x.test"}],
        "content": {"from": "s@s.test", "subject": "s", "text": "y".repeat(200_000)}
    });
    let post = |daemon: &Daemon| {
        curl(
            daemon,
            "POST",
            "/api/v1/transmissions",
            &[&format!("Authorization: {KEY}")],
            Some(("application/json", transmission.to_string().as_bytes())),
        )
    };
    let (status, text) = post(&daemon);
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("try again later"), "{text}");
    assert_eq!(daemon.child.try_wait().unwrap(), None, "gannetd died");
    assert_eq!(daemon.http_get("/health").0, 200);

    // Space returns: acceptance resumes.
    std::fs::remove_file(&ballast).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        n += 1;
        let reply = send(&daemon, n);
        if let Some(id) = reply.strip_prefix("250 2.0.0 OK queued as ") {
            accepted.push(id.trim().to_string());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acceptance did not resume: {reply}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, text) = post(&daemon);
    assert_eq!(status, 200, "{text}");
    daemon.stop();

    let spooled = common::spooled(&daemon.data_dir());
    for id in &accepted {
        assert!(
            spooled.iter().any(|m| &m.id == id),
            "{id} was acknowledged and lost"
        );
    }
    // Nothing refused was kept: the acknowledged ones and the transmission only.
    assert_eq!(spooled.len(), accepted.len() + 1);
    eprintln!(
        "{} messages accepted, {} refused on the full disk, acceptance resumed",
        accepted.len(),
        refused.len()
    );
    drop(daemon);
    drop(disk);
}
