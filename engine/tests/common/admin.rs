//! The admin API over curl, with a key of the admin role.

use std::process::Command;

use super::Daemon;

/// The admin API's key (role = "admin").
pub const ADMIN_KEY: &str = "gannet-admin-key-3f7a0c2d9e1b8456";

/// `[http]` keys giving the admin key.
pub fn admin_key_config() -> String {
    format!(
        "api_keys = [{{ name = \"ops\", key_sha256 = \"{}\", role = \"admin\" }}]\n",
        gannet_core::auth::KeyDigest::of(ADMIN_KEY)
    )
}

/// curl against the daemon's HTTP listener, with the admin key: (status, body).
pub fn curl(
    daemon: &Daemon,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> (u16, String) {
    curl_as(daemon, Some(ADMIN_KEY), method, path, body)
}

/// A bad request: (method, (content type, body), status, a word the error must
/// contain).
pub type Case<'a> = (&'a str, Option<(&'a str, &'a str)>, u16, &'a str);

/// Sends each bad request to `path` and checks its status and error; the error
/// texts.
pub fn refused(daemon: &Daemon, path: &str, cases: &[Case]) -> Vec<String> {
    cases
        .iter()
        .map(|&(method, body, status, needle)| {
            let (got, text) = curl(daemon, method, path, body);
            assert_eq!(got, status, "{method} {body:?}: {text}");
            assert!(text.contains(needle), "{method} {body:?}: {text}");
            text
        })
        .collect()
}

pub fn curl_as(
    daemon: &Daemon,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> (u16, String) {
    let url = format!("http://{}{path}", daemon.http);
    let mut command = Command::new("curl");
    command.args(["-sS", "-X", method, "-w", "\n%{http_code}", &url]);
    if let Some(key) = key {
        command.args(["-H", &format!("Authorization: {key}")]);
    }
    if let Some((content_type, body)) = body {
        command.args([
            "-H",
            &format!("content-type: {content_type}"),
            "--data-binary",
            body,
        ]);
    }
    let out = command
        .output()
        .expect("curl is installed by tools/install-peers.sh");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_string())
}

pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}
