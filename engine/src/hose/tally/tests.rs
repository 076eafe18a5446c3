use super::*;
use crate::hose::sparkpost::{Events, Filter, TypeSet, convert};
use store::Resolution;

fn config() -> MetricsApiConfig {
    MetricsApiConfig::default()
}

/// gannet event lines (at minute `minute`) converted as the hose does.
fn events(lines: &[String]) -> Events {
    let filter = Filter {
        types: TypeSet::of(TYPES).unwrap(),
        tenant: None,
    };
    let mut events = Events::new();
    for (i, line) in lines.iter().enumerate() {
        convert(line.as_bytes(), 0, i as u64 * 1000, &filter, &mut events).unwrap();
    }
    events
}

fn at(minute: u32) -> u64 {
    u64::from(minute) * 60_000 + 5_000
}

fn delivery(minute: u32, kind: &str, retries: u32, class: Option<u16>) -> String {
    let class = class.map_or(String::new(), |c| format!(",\"bounce_class\":{c}"));
    format!(
        r#"{{"type":"{kind}","timestamp_ms":{},"shard":0,"message_id":"m1","sender":"bounces@news.example","rcpt_to":"Ann@Gmail.test","queue":"q","site":"s","sending_ip":"192.0.2.7","response":"250 ok","response_code":250,"msg_size":1000,"num_retries":{retries},"queue_time":40,"ip_pool":"p1","tenant":"acme","campaign_id":"spring"{class}}}"#,
        at(minute)
    )
}

fn injection(minute: u32, rcpt: &str) -> String {
    format!(
        r#"{{"type":"injection","timestamp_ms":{},"shard":0,"message_id":"m1","transmission_id":"t1","campaign_id":"spring","template_id":"welcome","rcpt_to":"{rcpt}","msg_from":"news@news.example","subject":"hi","msg_size":900,"ip_pool":"p1","tenant":"acme","queue":"q"}}"#,
        at(minute)
    )
}

fn engagement(minute: u32, kind: &str, message: &str) -> String {
    format!(
        r#"{{"type":"{kind}","timestamp_ms":{},"shard":0,"message_id":"{message}","rcpt_to":"ann@gmail.test","campaign_id":"spring","tenant":"acme"}}"#,
        at(minute)
    )
}

fn total(tally: &Tally, counter: Counter) -> u64 {
    tally.read(|s| {
        s.buckets(Resolution::Day)
            .values()
            .flat_map(|rows| rows.values())
            .map(|c| c[counter as usize])
            .sum()
    })
}

#[test]
fn events_are_counted_by_what_sparkpost_counts() {
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::open(dir.path(), 1, &config()).unwrap();
    let now = now_minute();
    let lines = vec![
        injection(now, "ann@gmail.test"),
        delivery(now, "delivery", 0, None),
        delivery(now, "delivery", 2, None),
        delivery(now, "transient_failure", 0, None),
        delivery(now, "transient_failure", 1, None),
        delivery(now, "bounce", 0, Some(10)),
        delivery(now, "bounce", 0, Some(51)),
        delivery(now, "expiration", 3, None),
        delivery(now, "admin_bounce", 0, None),
        engagement(now, "open", "m1"),
        engagement(now, "open", "m1"),
        engagement(now, "click", "m1"),
        engagement(now, "click", "m2"),
    ];
    tally.add_batch(0, 100, &events(&lines)).unwrap();
    let expect = [
        (Counter::Injected, 1),
        (Counter::Delivered, 2),
        (Counter::DeliveredFirst, 1),
        (Counter::DeliveredSubsequent, 1),
        (Counter::TimeFirst, 40),
        (Counter::TimeSubsequent, 40),
        (Counter::MsgVolume, 2000),
        (Counter::Delayed, 2),
        (Counter::DelayedFirst, 1),
        (Counter::InbandBounce, 4),
        (Counter::HardBounce, 1),
        (Counter::BlockBounce, 1),
        // Expiration is class 24 (soft), an operator's bounce 25 (admin).
        (Counter::SoftBounce, 1),
        (Counter::AdminBounce, 1),
        (Counter::Rendered, 2),
        (Counter::UniqueRendered, 1),
        (Counter::Clicked, 2),
        (Counter::UniqueClicked, 2),
        (Counter::UniqueConfirmedOpened, 2),
    ];
    for (counter, n) in expect {
        assert_eq!(total(&tally, counter), n, "{counter:?}");
    }
    // The recipient's domain, lower case; the sending domain of msg_from.
    tally.read(|s| {
        let delivered = s
            .keys()
            .iter()
            .find(|k| &*k[Dim::SendingIp as usize] == "192.0.2.7")
            .unwrap();
        assert_eq!(&*delivered[Dim::Domain as usize], "gmail.test");
        assert_eq!(&*delivered[Dim::SendingDomain as usize], "news.example");
        assert_eq!(&*delivered[Dim::Tenant as usize], "acme");
        assert_eq!(&*delivered[Dim::Campaign as usize], "spring");
    });
}

#[test]
fn a_restart_keeps_every_tally_once_and_cuts_a_torn_journal_line() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_minute();
    {
        let tally = Tally::open(dir.path(), 2, &config()).unwrap();
        assert_eq!(tally.positions(), vec![0, 0]);
        tally
            .add_batch(0, 500, &events(&[injection(now, "a@x.test")]))
            .unwrap();
        tally
            .add_batch(1, 700, &events(&[engagement(now, "open", "m9")]))
            .unwrap();
    }
    // A crash in the middle of the next append.
    let journal = dir.path().join("metrics/journal");
    let mut bytes = std::fs::read(&journal).unwrap();
    bytes.extend_from_slice(b"0badc0de {\"log\":0,\"end\":9");
    std::fs::write(&journal, &bytes).unwrap();
    let tally = Tally::open(dir.path(), 2, &config()).unwrap();
    assert_eq!(tally.positions(), vec![500, 700]);
    assert_eq!(total(&tally, Counter::Injected), 1);
    assert_eq!(total(&tally, Counter::UniqueRendered), 1);
    // The engaged set survived: a second open of m9 is not unique.
    tally
        .add_batch(1, 800, &events(&[engagement(now, "open", "m9")]))
        .unwrap();
    assert_eq!(total(&tally, Counter::Rendered), 2);
    assert_eq!(total(&tally, Counter::UniqueRendered), 1);
    assert_eq!(
        std::fs::read(&journal).unwrap().len() as u64,
        tally.files.lock().unwrap().journal_bytes
    );
}

#[test]
fn a_snapshot_replaces_the_journal_and_a_crash_between_counts_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_minute();
    let journal = dir.path().join("metrics/journal");
    let old_journal;
    {
        let tally = Tally::open(dir.path(), 1, &config()).unwrap();
        tally
            .add_batch(0, 100, &events(&[injection(now, "a@x.test")]))
            .unwrap();
        tally
            .add_batch(0, 200, &events(&[injection(now, "b@y.test")]))
            .unwrap();
        old_journal = std::fs::read(&journal).unwrap();
        let store = tally.store.read().unwrap();
        tally.files.lock().unwrap().compact(&store).unwrap();
    }
    assert_eq!(std::fs::read(&journal).unwrap().len(), 0);
    let tally = Tally::open(dir.path(), 1, &config()).unwrap();
    assert_eq!(total(&tally, Counter::Injected), 2);
    assert_eq!(tally.positions(), vec![200]);
    tally
        .add_batch(0, 300, &events(&[injection(now, "c@z.test")]))
        .unwrap();
    drop(tally);
    // The crash between the snapshot and emptying the journal: its old lines are
    // behind the snapshot's positions.
    let mut both = old_journal;
    both.extend(std::fs::read(&journal).unwrap());
    std::fs::write(&journal, both).unwrap();
    let tally = Tally::open(dir.path(), 1, &config()).unwrap();
    assert_eq!(total(&tally, Counter::Injected), 3);
    assert_eq!(tally.positions(), vec![300]);
    tally.read(|s| assert_eq!(s.keys().len(), 3));
}

#[test]
fn a_journal_that_does_not_follow_its_snapshot_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_minute();
    {
        let tally = Tally::open(dir.path(), 1, &config()).unwrap();
        tally
            .add_batch(0, 100, &events(&[injection(now, "a@x.test")]))
            .unwrap();
    }
    // Another state's snapshot, holding a different key 0.
    let snapshot = serde_json::json!({"version": 1, "positions": [50], "folded": 0,
        "keys": [["t", "other.test", "", "", "", "", ""]], "rows": [], "engaged": []});
    std::fs::write(
        dir.path().join("metrics/snapshot.json"),
        snapshot.to_string(),
    )
    .unwrap();
    let tally = Tally::open(dir.path(), 1, &config()).unwrap();
    assert_eq!(tally.positions(), vec![0]);
    assert_eq!(total(&tally, Counter::Injected), 0);
    assert!(dir.path().join("metrics/journal.bad").exists());
}

#[test]
fn a_damaged_snapshot_is_set_aside_and_the_tally_starts_from_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("metrics")).unwrap();
    std::fs::write(dir.path().join("metrics/snapshot.json"), b"{\"version\":1,").unwrap();
    let tally = Tally::open(dir.path(), 1, &config()).unwrap();
    assert_eq!(tally.positions(), vec![0]);
    assert!(dir.path().join("metrics/snapshot.json.bad").exists());
}
