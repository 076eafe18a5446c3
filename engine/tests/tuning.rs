//! What tuning/ ships for running gannetd as a service: the systemd unit passes
//! `systemd-analyze verify` with no warning and `systemd-analyze security` rates it
//! hardened; the sysusers file and the starter configuration load; and gannetd runs
//! as the unit runs it — an unprivileged user keeping only CAP_NET_BIND_SERVICE
//! (setpriv, since the test machine has no systemd as PID 1) — binding a privileged
//! port and acknowledging mail durably.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Daemon;

fn tuning(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tuning")
        .join(file)
}

fn run(command: &mut Command) -> (bool, String, String) {
    let out = command.output().expect("the command runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The shipped unit with the test's gannetd where it installs to.
fn unit_here(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(tuning("gannetd.service")).unwrap();
    let path = dir.join("gannetd.service");
    std::fs::write(
        &path,
        text.replace("/usr/local/bin/gannetd", env!("CARGO_BIN_EXE_gannetd")),
    )
    .unwrap();
    path
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_here(dir.path());
    let (ok, out, err) = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(ok, "systemd-analyze verify: {out}{err}");
    assert_eq!(err.trim(), "", "verify warns");

    // The overall rating, and the settings it rests on.
    let (_, out, err) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit));
    let overall = format!("{out}{err}");
    let exposure: f64 = overall
        .split("Overall exposure level for gannetd.service:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in {overall}"));
    assert!(exposure <= 2.0, "exposure {exposure}: {overall}");
    let (ok, out, err) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--json=short"])
        .arg(&unit));
    assert!(ok, "{err}");
    let checks: Vec<serde_json::Value> = serde_json::from_str(out.trim()).unwrap();
    let set = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} not rated"))["set"]
            == true
    };
    for name in [
        "NoNewPrivileges=",
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateDevices=",
        "RestrictNamespaces=~user",
        "MemoryDenyWriteExecute=",
        "SystemCallArchitectures=",
        "SystemCallFilter=~@privileged",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "User=/DynamicUser=",
    ] {
        assert!(set(name), "{name} is not set: {out}");
    }
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in [
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "ReadWritePaths=/var/lib/gannet",
        "StateDirectory=gannet",
        "LimitMEMLOCK=64M",
        "Restart=on-failure",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing");
    }

    // The user it names, and the configuration it starts with.
    let (ok, out, err) = run(Command::new("systemd-sysusers")
        .arg("--dry-run")
        .arg(tuning("gannet.sysusers")));
    assert!(ok, "systemd-sysusers: {out}{err}");
    assert!(
        format!("{out}{err}").contains("Creating user 'gannet'"),
        "{out}{err}"
    );
    let (ok, out, err) = run(Command::new(env!("CARGO_BIN_EXE_gannetd"))
        .arg("--check-config")
        .arg(tuning("gannetd.toml")));
    assert!(ok && out.contains(": ok"), "{out}{err}");
}

/// A port under 1024 nobody listens on (bound as root to find out).
fn privileged_port() -> u16 {
    (600..1000)
        .rev()
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free privileged port")
}

/// A field of /proc/PID/status.
fn status(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

#[test]
fn gannetd_runs_unprivileged_with_only_the_bind_capability() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test switches to an unprivileged user with setpriv: run the suite as root (as tools/test.sh does in CI)"
    );
    let nobody = 65534;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(dir.path(), Some(nobody), Some(nobody)).unwrap();
    let port = privileged_port();
    let config = format!(
        "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = 2\n\
         [smtp]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [http]\nlisten = [\"127.0.0.1:0\"]\n[delivery]\nsuspended = true\n",
        dir.path().join("data").display()
    );
    let mut daemon = Daemon::start_under(
        dir,
        &config,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+net_bind_service",
            "--ambient-caps=-all,+net_bind_service",
            "--bounding-set=-all,+net_bind_service",
            "--no-new-privs",
        ],
        |_| {},
    );
    assert_eq!(daemon.smtp.port(), port);
    let pid = daemon.child.id();
    assert!(
        status(pid, "Uid:").starts_with("65534"),
        "{}",
        status(pid, "Uid:")
    );
    // Only bit 10, CAP_NET_BIND_SERVICE, in the effective and bounding sets.
    assert_eq!(status(pid, "CapEff:"), "0000000000000400");
    assert_eq!(status(pid, "CapBnd:"), "0000000000000400");
    assert_eq!(status(pid, "NoNewPrivs:"), "1");
    daemon.send_accepted("someone@example.test", "Subject: unit\r\n\r\nhi\r\n");
    daemon.stop();
    assert_eq!(common::spooled(&daemon.data_dir()).len(), 1);
}

/// Every key of the sysctl profile is one this kernel knows, with a value of the
/// form it takes (a typo would be skipped by `sysctl --system` with only a warning).
#[test]
fn the_sysctl_profile_names_real_keys() {
    let text = std::fs::read_to_string(tuning("sysctl.conf")).unwrap();
    let mut keys = 0;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("sysctl.conf:{}: not `key = value`", n + 1));
        let path = Path::new("/proc/sys").join(key.trim().replace('.', "/"));
        let current = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("sysctl.conf:{}: {}: {e}", n + 1, path.display()));
        // The same number of fields as the kernel shows (a range takes two, tcp_rmem
        // three), each a number.
        let fields: Vec<&str> = value.split_whitespace().collect();
        assert_eq!(
            fields.len(),
            current.split_whitespace().count(),
            "sysctl.conf:{}: {key} takes {:?}",
            n + 1,
            current.trim()
        );
        for f in fields {
            assert!(f.parse::<u64>().is_ok(), "sysctl.conf:{}: {f}", n + 1);
        }
        keys += 1;
    }
    assert!(keys >= 10, "{keys} keys");
}
