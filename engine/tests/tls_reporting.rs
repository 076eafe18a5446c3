//! TLS-RPT (RFC 8460) end to end on loopback: two domains publish MTA-STS policies
//! (dnsmasq; policies from Python's HTTPS server with the test CA's certificate)
//! and `_smtp._tls` records — one asks for reports by mail, one over HTTPS. With a
//! five-second reporting period, the reports arrive: the mailed one through
//! gannet's own queue at aiosmtpd (DKIM-signed by the reporting domain, verified
//! by dkimpy; read with mail-parser, gunzipped), the posted one
//! at the HTTPS server; each is checked field by field against RFC 8460's schema.

mod common;

use std::io::Read as _;

use mail_parser::MimeHeaders as _;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Daemon;
use common::peers::{dnsmasq, https_server};
use common::pki::{TestCa, self_signed, smtp_with_sni};
use common::relay::inject;

fn gunzip(bytes: &[u8]) -> serde_json::Value {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every report received so far: mailed ones (from aiosmtpd's store, their DKIM
/// signature verified by dkimpy with `dkim_records`) and posted ones (from the HTTPS
/// server's), with their transport's metadata checked.
fn reports(
    smtp_out: &Path,
    web: &Path,
    dkim_records: &serde_json::Value,
) -> Vec<(String, serde_json::Value)> {
    use base64::Engine as _;
    let mut out = Vec::new();
    for n in 1.. {
        let Ok(text) = std::fs::read_to_string(smtp_out.join(format!("{n}.json"))) else {
            break;
        };
        let stored: serde_json::Value = serde_json::from_str(&text).unwrap();
        if stored["rcpt_tos"][0] != "tls@reports.test" {
            continue;
        }
        let data = stored["data"].as_str().unwrap().as_bytes().to_vec();
        let signatures = common::dkimpy_verify(dkim_records, &data);
        assert_eq!(signatures.len(), 1, "{signatures:?}");
        assert_eq!(signatures[0]["d"], "gannet.test");
        assert_eq!(signatures[0]["ok"], true, "dkimpy: {signatures:?}");
        let message = mail_parser::MessageParser::default().parse(&data).unwrap();
        assert_eq!(
            stored["mail_from"],
            "noreply-smtp-tls-reporting@gannet.test"
        );
        assert_eq!(
            message.header_raw("TLS-Report-Domain").map(str::trim),
            Some("rpt.test")
        );
        assert!(
            message
                .subject()
                .unwrap()
                .starts_with("Report Domain: rpt.test Submitter: gannet.test Report-ID: <")
        );
        let content_type = message.content_type().unwrap();
        assert_eq!(content_type.ctype(), "multipart");
        assert_eq!(content_type.subtype(), Some("report"));
        assert_eq!(content_type.attribute("report-type"), Some("tlsrpt"));
        let attachment = message.attachment(0).unwrap();
        let ct = attachment.content_type().unwrap();
        assert_eq!(
            (ct.ctype(), ct.subtype()),
            ("application", Some("tlsrpt+gzip"))
        );
        assert!(attachment.attachment_name().unwrap().ends_with(".json.gz"));
        out.push(("mail".to_string(), gunzip(attachment.contents())));
    }
    for entry in std::fs::read_dir(web.join("posts"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).unwrap();
        let post: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(post["path"], "/v1/tlsrpt");
        assert_eq!(post["headers"]["content-type"], "application/tlsrpt+gzip");
        let body = base64::engine::general_purpose::STANDARD
            .decode(post["body"].as_str().unwrap())
            .unwrap();
        out.push(("https".to_string(), gunzip(&body)));
    }
    out
}

/// A report's only policy, checked against RFC 8460 4.4; (successes, failures).
fn check(report: &serde_json::Value, domain: &str) -> (u64, u64) {
    assert_eq!(report["organization-name"], "gannet.test", "{report}");
    assert_eq!(report["contact-info"], "postmaster@gannet.test");
    assert!(report["report-id"].as_str().unwrap().contains(domain));
    let start = report["date-range"]["start-datetime"].as_str().unwrap();
    let end = report["date-range"]["end-datetime"].as_str().unwrap();
    assert!(
        start.ends_with('Z') && end.ends_with('Z') && start < end,
        "{report}"
    );
    let policies = report["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 1);
    let policy = &policies[0];
    assert_eq!(policy["policy"]["policy-type"], "sts");
    assert_eq!(policy["policy"]["policy-domain"], domain);
    let strings = policy["policy"]["policy-string"].as_array().unwrap();
    assert_eq!(strings[0], "version: STSv1");
    assert_eq!(policy["policy"]["mx-host"][0], format!("mx.{domain}"));
    let summary = &policy["summary"];
    let ok = summary["total-successful-session-count"].as_u64().unwrap();
    let failed = summary["total-failure-session-count"].as_u64().unwrap();
    let details = policy["failure-details"].as_array().unwrap();
    let listed: u64 = details
        .iter()
        .map(|f| f["failed-session-count"].as_u64().unwrap())
        .sum();
    assert_eq!(listed, failed);
    for f in details {
        assert_eq!(f["result-type"], "certificate-not-trusted", "{f}");
        assert_eq!(f["receiving-mx-hostname"], format!("mx.{domain}"));
        assert_eq!(f["receiving-ip"], "127.0.0.1");
        assert!(f["additional-information"].is_string());
    }
    (ok, failed)
}

#[test]
fn aggregate_reports_go_by_mail_through_the_queue_and_by_https() {
    let ca = TestCa::new("gannet TLS-RPT CA");
    let certs = tempfile::tempdir().unwrap();
    ca.issue(&["mx.good.test"], true)
        .serve_as(certs.path(), "mx.good.test");
    // rpt.test's MX has a self-signed certificate: its testing policy reports it.
    self_signed(certs.path(), "mx.rpt.test");
    let (_smtp_peer, smtp_port, out) = smtp_with_sni(certs.path());
    let web = tempfile::tempdir().unwrap();
    for (domain, policy) in [
        ("rpt", "mode: testing\r\nmx: mx.rpt.test"),
        ("good", "mode: enforce\r\nmx: mx.good.test"),
    ] {
        let dir = web
            .path()
            .join(format!("mta-sts.{domain}.test/.well-known"));
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!("version: STSv1\r\n{policy}\r\nmax_age: 86400\r\n");
        std::fs::write(dir.join("mta-sts.txt"), text).unwrap();
    }
    let web_cert = ca.issue(
        &["mta-sts.rpt.test", "mta-sts.good.test", "collector.test"],
        true,
    );
    let (_web_peer, https_port) = https_server(web.path(), &web_cert.cert, &web_cert.key, None);
    let mut records = vec!["--local-ttl=60".to_string()];
    for domain in ["rpt", "good", "reports"] {
        records.push(format!("--mx-host={domain}.test,mx.{domain}.test,10"));
        records.push(format!("--host-record=mx.{domain}.test,127.0.0.1"));
    }
    for domain in ["rpt", "good"] {
        records.push(format!("--txt-record=_mta-sts.{domain}.test,v=STSv1; id=1"));
        records.push(format!("--host-record=mta-sts.{domain}.test,127.0.0.1"));
    }
    records.push("--txt-record=_smtp._tls.rpt.test,v=TLSRPTv1; rua=mailto:tls@reports.test".into());
    records.push(format!(
        "--txt-record=_smtp._tls.good.test,v=TLSRPTv1; rua=https://collector.test:{https_port}/v1/tlsrpt"
    ));
    records.push("--host-record=collector.test,127.0.0.1".into());
    let (_dns_peer, dns_port) = dnsmasq(&records);
    // Mailed reports must be DKIM-signed by the reporting domain (RFC 8460 5.3).
    let dkim_key = common::ed25519_key(web.path());
    let dkim_records = serde_json::json!({
        "rpt._domainkey.gannet.test.":
            gannet_engine::dkim::keys::load(&dkim_key).unwrap().dns_record(),
    });
    let config = format!(
        "[delivery]\ndns_server = \"127.0.0.1:{dns_port}\"\nsmtp_port = {smtp_port}\n\
         retry_interval_secs = 60\ntls_ca_file = \"{}\"\n\
         [delivery.mta_sts]\nhttps_port = {https_port}\n\
         [delivery.tls_reporting]\nperiod_secs = 5\nsend_after_secs = 2\n\
         [delivery.shaping]\nidle_timeout_secs = 0\nconnection_limit = 1\n\
         [dkim]\nkeys = [{{ domain = \"gannet.test\", selector = \"rpt\", key_file = \"{}\" }}]\n",
        ca.ca_file().display(),
        dkim_key.display()
    );
    let daemon = Daemon::start("", &config);
    for n in 0..3 {
        inject(
            &daemon,
            &[&format!("r{n}@rpt.test")],
            "Subject: rpt\r\n\r\nhello\r\n.\r\n",
        );
        inject(
            &daemon,
            &[&format!("r{n}@good.test")],
            "Subject: rpt\r\n\r\nhello\r\n.\r\n",
        );
    }
    // The sessions each domain's mail took (one source port each), as aiosmtpd
    // saw them. A session that carried no message is not seen there but is
    // reported (its handshake counts): one connection per site at a time
    // (connection_limit = 1) keeps a second connection from being opened for mail
    // the first then takes, so that every session reported carried a message.
    let sessions = |domain: &str| {
        let mut ports = std::collections::BTreeSet::new();
        for n in 1.. {
            let Ok(text) = std::fs::read_to_string(out.path().join(format!("{n}.json"))) else {
                break;
            };
            let stored: serde_json::Value = serde_json::from_str(&text).unwrap();
            if stored["rcpt_tos"][0].as_str().unwrap().ends_with(domain) {
                ports.insert(stored["peer_port"].as_u64().unwrap());
            }
        }
        ports.len() as u64
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut rpt, mut good) = ((0, 0), (0, 0));
    while Instant::now() < deadline {
        rpt = (0, 0);
        good = (0, 0);
        for (how, report) in reports(out.path(), web.path(), &dkim_records) {
            let domain = report["policies"][0]["policy"]["policy-domain"]
                .as_str()
                .unwrap()
                .to_string();
            let (ok, failed) = check(&report, &domain);
            let sum = match (how.as_str(), domain.as_str()) {
                ("mail", "rpt.test") => &mut rpt,
                ("https", "good.test") => &mut good,
                other => panic!("a report of {other:?}"),
            };
            sum.0 += ok;
            sum.1 += failed;
        }
        if rpt.1 >= 1
            && rpt.1 == sessions("@rpt.test")
            && good.0 >= 1
            && good.0 == sessions("@good.test")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every session to rpt.test found a certificate nobody vouches for (reported,
    // and the mail delivered: testing mode); every one to good.test was valid.
    assert_eq!(rpt, (0, sessions("@rpt.test")), "rpt.test's reports");
    assert_eq!(good, (sessions("@good.test"), 0), "good.test's reports");
    assert!(rpt.1 >= 1 && good.0 >= 1);
    assert!(daemon.metric("delivery_tls_reports_sent_total") >= 2);
    assert_eq!(daemon.metric("delivery_tls_report_failures_total"), 0);
}
