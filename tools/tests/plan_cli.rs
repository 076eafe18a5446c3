//! gannet-plan as a process: a short calibration against a real gannetd writes a
//! profile whose figures hang together, plans for the example workloads in
//! tuning/workloads/ come out as tables and JSON, and bad workloads, profiles and
//! binaries are refused with the file, key and line named.

use std::path::{Path, PathBuf};
use std::process::Command;

use gannet_tools::plan::profile::Profile;

fn plan_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gannet-plan"))
}

/// The gannetd binary of this build profile (built if the workspace has not yet).
fn gannetd() -> PathBuf {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_gannet-plan"))
        .parent()
        .unwrap()
        .to_path_buf();
    let gannetd = bin_dir.join("gannetd");
    if !gannetd.exists() {
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "gannet-engine", "--bin", "gannetd"]);
        if bin_dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(build.status().unwrap().success());
    }
    gannetd
}

fn workloads() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tuning/workloads");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn calibration_writes_a_profile_that_plans_the_example_workloads() {
    let dir = tempfile::tempdir().unwrap();
    let profile_path = dir.path().join("profile.json");
    let out = plan_cmd()
        .args(["calibrate", "--messages", "150"])
        .arg("--gannetd")
        .arg(gannetd())
        .arg("--dir")
        .arg(dir.path().join("scratch"))
        .arg("--out")
        .arg(&profile_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for what in [
        "disk",
        "SMTP acceptance",
        "queues per destination domain",
        "relay",
        "DKIM ed25519",
        "DKIM rsa2048",
        "TLS",
        "HTTP transmissions",
        "HTTP transmissions relayed",
    ] {
        assert!(stderr.contains(&format!("measuring {what}")), "{stderr}");
    }
    assert!(
        !dir.path().join("scratch").exists(),
        "the scratch directory is removed"
    );
    let p = Profile::load(&profile_path).unwrap();
    assert!(p.revision.starts_with("gannetd "), "{}", p.revision);
    assert!(p.date.ends_with("UTC"));
    assert!(p.host.cores >= 1 && p.host.memory_bytes > 0);
    assert_eq!(p.shards, 1);
    for (what, cost) in [
        ("accept", p.smtp_accept_us),
        ("relay", p.relay_us),
        ("http", p.http_us),
        ("http relay", p.http_relay_us),
    ] {
        assert!(cost.at(2048.0) > 1.0, "{what}: {cost:?}");
    }
    // RSA-2048 signs in hundreds of µs, Ed25519 in tens.
    let rsa = p.dkim_us["rsa2048"].at(2048.0);
    let ed = p.dkim_us["ed25519"].at(2048.0);
    assert!(rsa > 3.0 * ed, "rsa2048 {rsa} µs, ed25519 {ed} µs");
    assert!(p.tls.handshake_us > 0.0, "{:?}", p.tls);
    // The spool holds each body once, plus its record.
    let per_kib = p.spool_accept_bytes.per_kib;
    assert!((1000.0..1100.0).contains(&per_kib), "{per_kib}");
    assert!(p.spool_accept_bytes.base > 100.0);
    // Delivery appends its records (counted as appended: its segments may since
    // have been reclaimed).
    assert!(p.spool_relay_bytes.at(2048.0) > p.spool_accept_bytes.at(2048.0));
    // What reaches the disk is at least the body, in whole pages. (Not relay's above
    // acceptance's: each ran its own gannetd, whose group commits batch differently,
    // and a page is counted again each time a batch rewrites it.)
    for (what, written) in [
        ("accept", p.disk_write_accept_bytes.at(65536.0)),
        ("relay", p.disk_write_relay_bytes.at(65536.0)),
    ] {
        assert!(written >= 65536.0, "{what}: {written}");
    }
    assert!(p.disk.flush_p50_us > 0.0 && p.disk.flush_p99_us >= p.disk.flush_p50_us);
    assert!(p.disk.bandwidth_bytes_per_s > 1e6);
    assert!(p.queued_bytes_per_message > 0.0 && p.base_rss_bytes > 1e6);
    // A domain's queue costs something, and less than a megabyte.
    assert!((1.0..1e6).contains(&p.queue_bytes), "{}", p.queue_bytes);
    // Below the knee an acknowledgement waits under a second at the 99th percentile
    // beyond the disk's flushes (tens of ms on a loaded test machine, a few here).
    assert!(
        (0.0..1000.0).contains(&p.ack_p99_base_ms),
        "{}",
        p.ack_p99_base_ms
    );

    // Another disk measured alone: the profile comes back with its disk (and the
    // disk's name) replaced and everything else as calibrated.
    let other = dir.path().join("other-disk.json");
    let out = plan_cmd()
        .args(["calibrate", "--messages", "60", "--disk-only"])
        .arg(&profile_path)
        .arg("--dir")
        .arg(dir.path().join("disk-scratch"))
        .arg("--out")
        .arg(&other)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("measuring disk"), "{stderr}");
    assert!(!stderr.contains("measuring SMTP"), "{stderr}");
    assert!(!dir.path().join("disk-scratch").exists());
    let q = Profile::load(&other).unwrap();
    assert!(q.disk.bandwidth_bytes_per_s > 1e6 && q.disk.flush_p50_us > 0.0);
    assert_ne!(q.disk, p.disk, "measured again");
    assert_eq!(
        Profile {
            disk: p.disk,
            host: p.host.clone(),
            ..q.clone()
        },
        p
    );

    for workload in workloads() {
        let out = plan_cmd()
            .arg("plan")
            .arg(&workload)
            .arg("--profile")
            .arg(&profile_path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("first to saturate:"), "{text}");
        assert!(text.contains("hosts for the peak:"), "{text}");
        let out = plan_cmd()
            .arg("plan")
            .arg(&workload)
            .arg("--profile")
            .arg(&profile_path)
            .arg("--json")
            .output()
            .unwrap();
        assert!(out.status.success());
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<&str> = plan["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        for name in [
            "cpu",
            "disk bandwidth",
            "disk flush latency",
            "memory",
            "ephemeral ports",
        ] {
            assert!(names.contains(&name), "{workload:?}: {names:?}");
        }
        assert!(names.contains(&plan["bottleneck"].as_str().unwrap()));
        let sustainable = plan["sustainable_per_s"].as_f64().unwrap();
        let lowest = plan["resources"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["limit_per_s"].as_f64())
            .fold(f64::INFINITY, f64::min);
        assert_eq!(sustainable, lowest);
        let peak = plan["peak_per_s"].as_f64().unwrap();
        let hosts = plan["hosts"].as_u64().unwrap() as f64;
        // The predicted acknowledgement p99 is at least the disk's flushes and the
        // measured protocol wait. A slow host (a debug build on a loaded test
        // machine) can wait past the workload's target with no load at all: then no
        // host meets it, and the plan says why.
        let floor = p.ack_p99_base_ms + (p.disk.flush_p50_us + p.disk.flush_p99_us) / 1000.0;
        let target = gannet_tools::plan::workload::Workload::load(&workload)
            .unwrap()
            .ack_p99_ms;
        if floor >= target {
            assert_eq!(hosts, 0.0);
            assert!(plan["ack_p99_ms"].is_null());
            let notes = plan["notes"].to_string();
            assert!(notes.contains("no rate meets it on this host"), "{notes}");
            continue;
        }
        let ack = plan["ack_p99_ms"].as_f64().unwrap();
        assert!(ack >= floor - 1e-9, "{ack} < {floor}");
        assert!(hosts >= 1.0 && hosts * sustainable >= peak && (hosts - 1.0) * sustainable < peak);
    }
}

#[test]
fn bad_inputs_are_refused_with_file_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let workload = dir.path().join("w.toml");
    std::fs::write(
        &workload,
        "messages_per_day = 1000\nsizes = [[1000, 1.0]]\nhttp_share = 1.5\n",
    )
    .unwrap();
    let profile = dir.path().join("p.json");
    std::fs::write(&profile, "{\n  \"revision\": 3\n}\n").unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = plan_cmd().args(args).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let plan_with = |profile: &Path| {
        run(&[
            "plan".as_ref(),
            workload.as_os_str(),
            "--profile".as_ref(),
            profile.as_os_str(),
        ])
    };
    let err = plan_with(&profile);
    assert!(
        err.contains(&format!(
            "{}:3:1: key `http_share`: must be between 0 and 1",
            workload.display()
        )),
        "{err}"
    );
    std::fs::write(
        &workload,
        "messages_per_day = 1000\nsizes = [[1000, 1.0]]\n",
    )
    .unwrap();
    let err = plan_with(&profile);
    assert!(
        err.contains(&format!("{}:2:", profile.display()))
            && err.contains("not a gannet-plan profile"),
        "{err}"
    );
    let err = run(&[
        "calibrate".as_ref(),
        "--disk-only".as_ref(),
        profile.as_os_str(),
        "--dir".as_ref(),
        dir.path().join("d").as_os_str(),
    ]);
    assert!(
        err.contains(&format!("{}:2:", profile.display()))
            && err.contains("not a gannet-plan profile"),
        "{err}"
    );
    let missing = dir.path().join("none.json");
    let err = plan_with(&missing);
    assert!(
        err.contains("cannot read") && err.contains("none.json"),
        "{err}"
    );
    let err = run(&[
        "calibrate".as_ref(),
        "--gannetd".as_ref(),
        dir.path().join("no-gannetd").as_os_str(),
    ]);
    assert!(
        err.contains("cannot run") && err.contains("give --gannetd"),
        "{err}"
    );
    let err = run(&[
        "calibrate".as_ref(),
        "--gannetd".as_ref(),
        gannetd().as_os_str(),
        "--messages".as_ref(),
        "3".as_ref(),
        "--dir".as_ref(),
        dir.path().join("s").as_os_str(),
    ]);
    assert!(err.contains("--messages: at least 10"), "{err}");
}
