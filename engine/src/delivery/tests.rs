//! The SMTP client against servers nobody on this project wrote: Python's aiosmtpd
//! (content checks, STARTTLS, per-recipient refusals, SMTPUTF8) and postfix's
//! smtp-sink (PIPELINING). Both are installed by tools/test.sh.

use std::path::Path;
use std::time::Duration;

use super::client::{ClientError, ClientOptions, Envelope, Session, Timeouts, TlsMode};
use super::tls::ClientTls;
use crate::test_peers::{Peer, free_port};

/// Starts aiosmtpd, with STARTTLS on a self-signed pair generated in `cert_dir` when
/// one is given.
fn aiosmtpd(out: &Path, cert_dir: Option<&Path>) -> (Peer, u16) {
    let Some(dir) = cert_dir else {
        return crate::test_peers::aiosmtpd(out, None);
    };
    let pair = rcgen::generate_simple_self_signed(vec!["sink.test".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
    crate::test_peers::aiosmtpd(out, Some((&cert, &key)))
}

fn options(tls: TlsMode) -> ClientOptions {
    ClientOptions {
        ehlo_name: "gannet.test".into(),
        source: Some("127.0.0.1".parse().unwrap()),
        tls: super::client::TlsWant::of(tls),
        timeouts: Timeouts {
            connect: Duration::from_secs(10),
            ..Timeouts::default()
        },
        auth: None,
        proxy: None,
    }
}

fn received(out: &Path, n: usize) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join(format!("{n}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn run<F: Future<Output = ()> + 'static>(f: impl FnOnce() -> F + Send + 'static) {
    glommio::LocalExecutorBuilder::default()
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn delivers_to_aiosmtpd_with_starttls_and_per_recipient_results() {
    let out = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (_peer, port) = aiosmtpd(out.path(), Some(certs.path()));
    let out_path = out.path().to_path_buf();
    run(move || async move {
        let tls = ClientTls::new();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut session =
            Session::connect(addr, "sink.test", &options(TlsMode::Opportunistic), &tls)
                .await
                .unwrap();
        assert!(
            session.tls.as_deref().unwrap_or("").starts_with("TLSv1."),
            "{:?}",
            session.tls
        );
        let body = "Subject: t\r\n\r\n.leading dot\r\n..two\r\n.\r\nhéllo\r\n".as_bytes();
        // aiosmtpd offers no PIPELINING: the next message's envelope is never sent
        // ahead (the smtp-sink test below covers that), each goes on its own.
        assert!(!session.pipelines());
        let second = Envelope {
            sender: "ü@b.test",
            recipients: &["ö@d.test"],
            body: b"Subject: u\r\n\r\nx\r\n",
        };
        let third = Envelope {
            sender: "s@b.test",
            recipients: &["permfail@d.test"],
            body: b"x\r\n",
        };
        let t = session
            .send(
                "s@b.test",
                &["ok@d.test", "tempfail@d.test", "permfail@d.test"],
                body,
                Some(second),
            )
            .await
            .unwrap();
        assert_eq!(t.outcome(0).code, 250, "{t:?}");
        assert_eq!(t.outcome(1).code, 451, "{t:?}");
        assert_eq!(t.outcome(2).code, 550, "{t:?}");
        assert_eq!(t.outcome(2).enhanced(), Some("5.1.1"));
        assert!(!session.is_primed());
        // The connection is reused for the next message, here with SMTPUTF8.
        let t = session
            .send(second.sender, second.recipients, second.body, Some(third))
            .await
            .unwrap();
        assert_eq!(t.outcome(0).code, 250, "{t:?}");
        assert!(!session.is_primed());
        // No recipient accepted: nothing is sent, and the session stays usable.
        let t = session
            .send(third.sender, third.recipients, third.body, None)
            .await
            .unwrap();
        assert_eq!((t.outcome(0).code, t.data.is_none()), (550, true));
        assert!(!session.is_primed());
        let t = session
            .send("s@b.test", &["ok@d.test"], b"x\r\n", None)
            .await
            .unwrap();
        assert_eq!(t.outcome(0).code, 250, "{t:?}");
        session.quit().await;

        let first = received(&out_path, 1);
        assert_eq!(first["mail_from"], "s@b.test");
        assert_eq!(first["rcpt_tos"], serde_json::json!(["ok@d.test"]));
        assert_eq!(first["tls"], true);
        assert_eq!(latin1_bytes(first["data"].as_str().unwrap()), body);
        assert!(
            first["mail_options"].to_string().contains("BODY=8BITMIME"),
            "{first}"
        );
        let second = received(&out_path, 2);
        assert!(
            second["mail_options"].to_string().contains("SMTPUTF8"),
            "{second}"
        );
        // The third transaction (no recipient accepted) sent no message: the fourth
        // is the third received.
        let fourth = received(&out_path, 3);
        assert_eq!(fourth["rcpt_tos"], serde_json::json!(["ok@d.test"]));
        assert_eq!(fourth["data"], "x\r\n");
        assert!(!out_path.join("4.json").exists());

        // Required TLS refuses a certificate that no root vouches for.
        let err = Session::connect(addr, "sink.test", &options(TlsMode::Required), &tls)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::TlsRequired { .. }), "{err}");
        assert_eq!(err.response().code, 451);
        // Disabled TLS stays in plaintext.
        let session = Session::connect(addr, "sink.test", &options(TlsMode::Disabled), &tls)
            .await
            .unwrap();
        assert!(session.tls.is_none());
        session.quit().await;
    });
}

/// aiosmtpd's content, stored as latin-1 text (one char per byte), as bytes.
fn latin1_bytes(text: &str) -> Vec<u8> {
    text.chars().map(|c| c as u8).collect()
}

#[test]
fn pipelines_with_smtp_sink_and_reports_connection_failures() {
    let (_peer, port) = crate::test_peers::smtp_sink(&[]);
    run(move || async move {
        let tls = ClientTls::new();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut session = Session::connect(addr, "sink.test", &options(TlsMode::Disabled), &tls)
            .await
            .unwrap();
        assert!(session.extensions.pipelining);
        let envelope = Envelope {
            sender: "s@b.test",
            recipients: &["a@d.test", "b@d.test"],
            body: b"Subject: p\r\n\r\nbody\r\n",
        };
        for i in 0..3 {
            // The first two carry the next message's envelope behind their end.
            let next = (i < 2).then_some(envelope);
            let t = session
                .send(envelope.sender, envelope.recipients, envelope.body, next)
                .await
                .unwrap();
            assert!(
                t.outcome(0).is_positive() && t.outcome(1).is_positive(),
                "{t:?}"
            );
            assert_eq!(session.is_primed(), i < 2);
        }
        session.quit().await;

        // Nothing listens on a fresh port: a connect error, transient for the caller.
        let closed = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let err = Session::connect(closed, "x", &options(TlsMode::Opportunistic), &tls)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert_eq!(err.response().code, 451);
    });
}
