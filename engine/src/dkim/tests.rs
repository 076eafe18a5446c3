use super::*;

/// RFC 8463 Appendix A: the example message (the RFC 6376 one) and the Ed25519 key
/// whose seed is A.2's private key.
const RFC_MESSAGE: &[u8] = b"From: Joe SixPack <joe@football.example.com>\r\n\
To: Suzie Q <suzie@shopping.example.net>\r\n\
Subject: Is dinner ready?\r\n\
Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n\
Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n\
\r\n\
Hi.\r\n\
\r\n\
We lost the game.  Are you hungry yet?\r\n\
\r\n\
Joe.\r\n";

const RFC_SEED: &str = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=";
const RFC_PUBLIC: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

fn rfc_signer() -> Signer {
    let seed = B64.decode(RFC_SEED).unwrap();
    Signer {
        domain: "football.example.com".into(),
        selector: "brisbane".into(),
        key: Key::Ed25519(ed25519_dalek::SigningKey::from_bytes(
            &seed.try_into().unwrap(),
        )),
        header_canon: Canon::Relaxed,
        body_canon: Canon::Relaxed,
        headers: ["from", "to", "subject", "date", "message-id"]
            .map(String::from)
            .to_vec(),
        oversign: ["from", "subject", "date"].map(String::from).to_vec(),
        expire_secs: None,
        body_length: false,
    }
}

/// The published Ed25519 signature of RFC 8463 A.3, reproduced: the same body hash,
/// and (Ed25519 being deterministic) the same signature over the same header text.
#[test]
fn rfc8463_example_key_signs_the_example_to_the_published_signature() {
    let signer = rfc_signer();
    assert_eq!(signer.key.dns_public(), ("ed25519", RFC_PUBLIC.to_string()));
    assert_eq!(
        body_hash(Canon::Relaxed, canon::split(RFC_MESSAGE).1),
        "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="
    );
    // The field as published, with b= empty (its own spacing around the colons of h=).
    let head = "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n \
d=football.example.com; i=@football.example.com;\r\n \
q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n \
subject : date : message-id : from : subject : date;\r\n \
bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n \
b=";
    let (fields, _) = canon::split(RFC_MESSAGE);
    let names = signer.signed_names(&fields);
    assert_eq!(
        names.join(":"),
        "from:from:to:subject:subject:date:date:message-id"
    );
    // h= of the example lists the over-signed names at the end.
    let published: Vec<String> = [
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "from",
        "subject",
        "date",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(
        signer.signature(&fields, &published, head).unwrap(),
        "/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11BusFa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw=="
    );
}

#[test]
fn signature_fields_are_folded_and_name_every_tag() {
    let mut signer = rfc_signer();
    signer.expire_secs = Some(86_400);
    signer.body_length = true;
    let field = signer.sign(RFC_MESSAGE, 1_700_000_000).unwrap();
    assert!(field.starts_with("DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;"));
    assert!(field.ends_with("\r\n"));
    for line in field.trim_end().split("\r\n") {
        assert!(line.len() <= LINE_MAX, "{line:?}");
    }
    let unfolded = field.replace("\r\n", "");
    for tag in [
        " d=football.example.com;",
        " s=brisbane;",
        " t=1700000000;",
        " x=1700086400;",
        " l=54;",
        " h=from:from:to:subject:subject:date:date:message-id;",
        " bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
    ] {
        assert!(unfolded.contains(tag), "{tag} in {unfolded}");
    }
    assert_eq!(
        signer
            .sign(b"Subject: no from\r\n\r\nx\r\n", 1)
            .unwrap_err(),
        SignError::NoFrom
    );
}

#[test]
fn keys_load_from_pem_and_bad_ones_are_named() {
    use ring::signature::{Ed25519KeyPair, KeyPair as _};
    // ring writes PKCS#8 v2 (with the public key); the signer reads it with dalek.
    let ed = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let pem_of = |der: &[u8]| {
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            B64.encode(der)
        )
    };
    let key = keys::parse(pem_of(ed.as_ref()).as_bytes()).unwrap();
    assert_eq!(key.algorithm(), "ed25519-sha256");
    let ring_public = Ed25519KeyPair::from_pkcs8(ed.as_ref()).unwrap();
    assert_eq!(
        key.dns_record(),
        format!(
            "v=DKIM1; k=ed25519; p={}",
            B64.encode(ring_public.public_key().as_ref())
        )
    );
    // A v2 key whose public key is not its private key's is refused.
    let mut mismatched = ed.as_ref().to_vec();
    let last = mismatched.len() - 1;
    mismatched[last] ^= 1;
    assert!(keys::parse(pem_of(&mismatched).as_bytes()).is_err());
    assert!(
        keys::parse(b"not a key")
            .unwrap_err()
            .contains("no PEM private key")
    );
    let junk = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    assert!(
        keys::parse(junk.as_bytes())
            .unwrap_err()
            .contains("1024 to 4096")
    );
}

fn rsa_pem(bits: usize) -> String {
    use rsa::pkcs8::EncodePrivateKey as _;
    rsa::RsaPrivateKey::new(&mut rand_core::OsRng, bits)
        .unwrap()
        .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap()
        .to_string()
}

/// ring refuses RSA keys under 2048 bits; 1024 to 2047 are signed by the `rsa`
/// crate, and ring's legacy verifier (an independent implementation) accepts the
/// signature over exactly the bytes signed.
#[test]
fn short_rsa_keys_sign_and_verify_and_shorter_ones_are_refused() {
    let key = keys::parse(rsa_pem(1024).as_bytes()).unwrap();
    assert!(matches!(key, Key::RsaShort(_)));
    assert_eq!(key.algorithm(), "rsa-sha256");
    let (k, p) = key.dns_public();
    assert_eq!(k, "rsa");
    let spki = B64.decode(p).unwrap();
    let mut signer = rfc_signer();
    signer.key = key;
    let field = signer.sign(RFC_MESSAGE, 1_700_000_000).unwrap();
    assert!(field.contains("a=rsa-sha256;"), "{field}");
    // The signature over From and a given field head, checked by ring.
    let (fields, _) = canon::split(RFC_MESSAGE);
    let head = "DKIM-Signature: v=1; a=rsa-sha256; d=football.example.com; s=old; h=from; b=";
    let b = signer
        .signature(&fields, &["from".to_string()], head)
        .unwrap();
    let signature = B64.decode(b).unwrap();
    assert_eq!(signature.len(), 128);
    let mut data = Vec::new();
    canon::header(Canon::Relaxed, fields[0].raw, true, &mut data);
    canon::header(Canon::Relaxed, head.as_bytes(), false, &mut data);
    // The SubjectPublicKeyInfo ends with the PKCS#1 RSAPublicKey (140 bytes here).
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
        &spki[spki.len() - 140..],
    );
    public.verify(&data, &signature).unwrap();
    data.push(b'x');
    assert!(public.verify(&data, &signature).is_err());

    let err = keys::parse(rsa_pem(768).as_bytes()).unwrap_err();
    assert!(
        err.contains("768-bit") && err.contains("1024 to 4096"),
        "{err}"
    );
}
