//! The ESMTP server: an accept loop per listener per shard, and a session task per
//! connection. Code map: [`session`] (the socket side), [`verbs`] (one module per
//! command), [`data`] (the DATA/BDAT scanner), [`gannet_core::message`] (header checks,
//! Received, Message-ID), [`gannet_core::address`] (paths and parameters), [`gannet_core::reply`].

pub mod data;
pub mod feedback;
pub mod session;
pub mod verbs;

#[cfg(test)]
pub(crate) mod tests;

use std::rc::Rc;
use std::time::Duration;

use glommio::net::TcpListener;

use gannet_core::reply;

use crate::delivery::Dispatcher;
use crate::io::Conn;
use crate::metrics::ShardMetrics;

/// Accepts connections until shutdown; `implicit_tls` starts TLS before the greeting.
pub async fn serve(delivery: Rc<Dispatcher>, listener: TcpListener, implicit_tls: bool) {
    let shard = &delivery.shard;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.shutdown.wait().await;
            None
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(stream)) => stream,
            Some(Err(err)) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(shard = shard.id, "accept failed: {err}");
                crate::timer::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let delivery = delivery.clone();
        glommio::spawn_local(async move {
            let shard = &delivery.shard;
            // TCP_NODELAY comes from the listener (io::listen).
            let Ok(peer) = stream.peer_addr() else {
                return;
            };
            let slot = match shard.shared.sessions.enter(peer.ip()) {
                Ok(slot) => slot,
                Err(limit) => {
                    ShardMetrics::add(&shard.metrics.smtp_sessions_refused_total, 1);
                    tracing::info!(shard = shard.id, %peer, limit, "session refused");
                    let mut conn = Conn::Plain(stream);
                    let mut out = Vec::new();
                    reply::TOO_MANY_SESSIONS.encode(&mut out);
                    let _ = conn.write_all(&out, Duration::from_secs(5)).await;
                    conn.close().await;
                    return;
                }
            };
            let mut conn = Conn::Plain(stream);
            if implicit_tls {
                let Some(config) = shard.shared.tls.clone() else {
                    return;
                };
                if let Err(err) = conn.start_tls(config, Duration::from_secs(60)).await {
                    tracing::debug!(%peer, "implicit TLS handshake failed: {err}");
                    return;
                }
                ShardMetrics::add(&shard.metrics.smtp_tls_handshakes_total, 1);
            }
            ShardMetrics::add(&shard.metrics.smtp_sessions_total, 1);
            ShardMetrics::add(&shard.metrics.smtp_sessions_active, 1);
            shard.sessions_active.set(shard.sessions_active.get() + 1);
            session::run(delivery.clone(), conn, peer).await;
            shard.sessions_active.set(shard.sessions_active.get() - 1);
            ShardMetrics::sub(&shard.metrics.smtp_sessions_active, 1);
            drop(slot);
        })
        .detach();
    }
}
