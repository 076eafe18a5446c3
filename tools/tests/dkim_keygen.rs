//! `gannet-dkim keygen`: the key files it writes are private PKCS#8 keys whose public
//! halves are the `p=` of the TXT records it prints; bad sizes are refused.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use base64::Engine as _;
use ring::signature::KeyPair as _;

fn keygen(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gannet-dkim"))
        .args(["keygen", "--domain", "ex.test", "--out"])
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

/// The p= of the printed record (its quoted strings joined).
fn p_of(stdout: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().next().unwrap();
    let joined: String = line.split('"').skip(1).step_by(2).collect();
    let p = joined.split("p=").nth(1).unwrap();
    base64::engine::general_purpose::STANDARD.decode(p).unwrap()
}

fn pkcs8_of(path: &std::path::Path) -> Vec<u8> {
    let pem = std::fs::read_to_string(path).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

#[test]
fn keys_and_records_match() {
    let dir = tempfile::tempdir().unwrap();
    let out = keygen(dir.path(), &["--selector", "e", "--algorithm", "ed25519"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("e._domainkey.ex.test. IN TXT \"v=DKIM1; k=ed25519; p="),
        "{text}"
    );
    let path = dir.path().join("ex.test.e.pem");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8_of(&path)).unwrap();
    assert_eq!(pair.public_key().as_ref(), p_of(&out.stdout));

    let out = keygen(dir.path(), &["--selector", "r", "--bits", "2048"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = ring::signature::RsaKeyPair::from_pkcs8(&pkcs8_of(&dir.path().join("ex.test.r.pem")))
        .unwrap();
    assert_eq!(key.public().modulus_len(), 256);
    // p= is the SubjectPublicKeyInfo: it ends with the PKCS#1 public key ring sees.
    let p = p_of(&out.stdout);
    assert!(
        p.ends_with(key.public().as_ref()),
        "SPKI around the RSA public key"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\" \""),
        "a record over 255 bytes is split"
    );

    // An existing file is never overwritten; sizes gannet cannot sign with are
    // refused; 1024 bits is made, with a warning.
    let again = keygen(dir.path(), &["--selector", "r"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("ex.test.r.pem"));
    for bits in ["512", "8192"] {
        let refused = keygen(dir.path(), &["--selector", "bad", "--bits", bits]);
        assert!(!refused.status.success());
        assert!(String::from_utf8_lossy(&refused.stderr).contains("1024 to 4096"));
    }
    let short = keygen(dir.path(), &["--selector", "short", "--bits", "1024"]);
    assert!(short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("weak"));
    let p = p_of(&short.stdout);
    // A 1024-bit SubjectPublicKeyInfo is 162 bytes.
    assert_eq!(p.len(), 162);
}
