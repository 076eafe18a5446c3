//! In-process tests of the SMTP server over a real loopback socket, on a spool whose
//! disk is simulated, so that fdatasync can be made to fail under a live session.

use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use gannet_spool::{SimStorage, SpoolConfig};
use glommio::net::TcpStream;

use crate::services::ShardServices;
use crate::storage::ShardStorage;

fn services(events_dir: &std::path::Path) -> Rc<ShardServices> {
    let spool_config = SpoolConfig {
        sync_retry_interval_ms: 50,
        ..SpoolConfig::for_shard(0)
    };
    ShardServices::on_sim(events_dir, SimStorage::new(7), spool_config)
}

/// Sends `bytes` and returns the next complete reply (all lines), "" at end of stream.
async fn say(stream: &mut TcpStream, bytes: &[u8]) -> String {
    if !bytes.is_empty() {
        stream.write_all(bytes).await.unwrap();
    }
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte).await {
            Ok(1) => reply.push(byte[0]),
            _ => return String::from_utf8(reply).unwrap(),
        }
        if reply.ends_with(b"\r\n") {
            let last = reply[..reply.len() - 2]
                .rsplit(|b| *b == b'\n')
                .next()
                .unwrap_or(&[]);
            if last.len() >= 4 && last[3] == b' ' {
                return String::from_utf8(reply).unwrap();
            }
        }
    }
}

/// Runs a transaction up to the reply after the message data.
async fn transaction(stream: &mut TcpStream) -> String {
    assert!(
        say(stream, b"MAIL FROM:<a@b.test>\r\n")
            .await
            .starts_with("250")
    );
    assert!(
        say(stream, b"RCPT TO:<c@d.test>\r\n")
            .await
            .starts_with("250")
    );
    assert!(say(stream, b"DATA\r\n").await.starts_with("354"));
    say(stream, b"Subject: x\r\n\r\nbody\r\n.\r\n").await
}

async fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    assert!(say(&mut stream, b"").await.starts_with("220 gannet.test"));
    assert!(
        say(&mut stream, b"EHLO c.test\r\n")
            .await
            .starts_with("250")
    );
    stream
}

/// A shard's listener shares its address with the other shards' (SO_REUSEPORT), and
/// connections accepted on it have TCP_NODELAY from it, without a call of their own.
#[test]
fn listeners_share_their_address_and_pass_no_delay_to_connections() {
    glommio::LocalExecutorBuilder::default()
        .spawn(|| async move {
            let listener = crate::io::listen("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            drop(crate::io::listen(addr).expect("a second listener on the address"));
            let _client = TcpStream::connect(addr).await.unwrap();
            let accepted = listener.accept().await.unwrap();
            assert!(accepted.nodelay().unwrap());
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn failed_sync_is_451_then_421_until_the_disk_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().to_path_buf();
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            let services = services(&events);
            let shard = services.shard.clone();
            let listener = crate::io::listen("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            glommio::spawn_local(super::serve(services.delivery.clone(), listener, false)).detach();
            let ShardStorage::Sim(sim) = shard.spool.storage() else {
                unreachable!()
            };

            let mut client = connect(addr).await;
            assert!(
                transaction(&mut client)
                    .await
                    .starts_with("250 2.0.0 OK queued as")
            );

            // The sync covering the next message fails: it is refused with 451, the
            // session goes on, and while the spool is unhealthy MAIL gets 421.
            sim.fail_syncs(1_000_000);
            let reply = transaction(&mut client).await;
            assert!(reply.starts_with("451 4.3.0"), "{reply}");
            let reply = say(&mut client, b"MAIL FROM:<a@b.test>\r\n").await;
            assert!(reply.starts_with("421 4.3.0"), "{reply}");
            assert_eq!(
                say(&mut client, b"").await,
                "",
                "the session ends after 421"
            );
            assert!(!shard.spool.is_healthy());

            // Once syncs succeed again the probe restores the spool.
            sim.fail_syncs(0);
            for _ in 0..100 {
                if shard.spool.is_healthy() {
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            assert!(shard.spool.is_healthy());
            let mut client = connect(addr).await;
            assert!(
                transaction(&mut client)
                    .await
                    .starts_with("250 2.0.0 OK queued as")
            );
            let m = &shard.metrics;
            assert_eq!(
                m.smtp_messages_accepted_total
                    .load(std::sync::atomic::Ordering::Relaxed),
                2
            );
            assert_eq!(
                m.smtp_spool_failures_total
                    .load(std::sync::atomic::Ordering::Relaxed),
                1
            );
            shard.shutdown.raise();
        })
        .unwrap()
        .join()
        .unwrap();
}
