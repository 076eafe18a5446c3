use super::*;
use crate::hose::tally::store::{DIMS, Limits};

/// 2026-12-07T10:00Z in unix minutes.
const T0: u32 = 29_943_960;

fn store() -> Store {
    let mut store = Store::new(Limits {
        keys_max: 100,
        engaged_max: 100,
        retention: [u32::MAX / 4; 3],
    });
    let mut add = |minute: u32, key: [&str; DIMS], counter: Counter, n: u64| {
        let id = match store.intern(key) {
            Ok(id) | Err(id) => id,
        };
        let mut counts = [0; COUNTERS];
        counts[counter as usize] = n;
        store.add(minute, id, &counts, T0 + 60);
    };
    // tenant, domain, campaign, template, sending ip, pool, sending domain
    let gmail = [
        "acme",
        "gmail.test",
        "spring",
        "welcome",
        "192.0.2.1",
        "p1",
        "acme.test",
    ];
    let yahoo = [
        "acme",
        "yahoo.test",
        "fall",
        "promo",
        "192.0.2.2",
        "p2",
        "acme.test",
    ];
    let other = [
        "",
        "gmail.test",
        "spring",
        "",
        "192.0.2.1",
        "p1",
        "zeta.test",
    ];
    add(T0, gmail, Counter::Injected, 10);
    add(T0, gmail, Counter::Delivered, 8);
    add(T0 + 7, gmail, Counter::InbandBounce, 2);
    add(T0 + 7, gmail, Counter::OutofbandBounce, 1);
    add(T0 + 20, yahoo, Counter::Injected, 5);
    add(T0 + 20, yahoo, Counter::PolicyRejection, 3);
    add(T0 + 20, yahoo, Counter::Delivered, 5);
    add(T0 + 30, other, Counter::Injected, 4);
    add(T0 - 1440 * 3, gmail, Counter::Injected, 100);
    store
}

fn params(query: &[(&str, &str)]) -> Vec<(String, String)> {
    query
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const NOW: u64 = (T0 as u64 + 59) * 60_000;

fn ask(view: View, query: &[(&str, &str)], tenant: Option<&str>) -> Result<Value, Invalid> {
    let pairs = params(query);
    run(&store(), view, &Params::new(&pairs), tenant, NOW)
}

fn ok(view: View, query: &[(&str, &str)]) -> Value {
    ask(view, query, None).unwrap_or_else(|e| panic!("{query:?}: {e:?}"))
}

fn err(view: View, query: &[(&str, &str)]) -> String {
    ask(view, query, None).unwrap_err().description
}

#[test]
fn the_summary_sums_the_window_and_derives_sparkposts_metrics() {
    let v = ok(
        View::Summary,
        &[
            ("from", "2026-12-07T10:00"),
            (
                "metrics",
                "count_targeted,count_injected,count_rejected,count_sent,count_accepted,count_bounce,count_admin_bounce",
            ),
        ],
    );
    let r = &v["results"][0];
    assert_eq!(r["count_injected"], 19);
    assert_eq!(r["count_rejected"], 3);
    assert_eq!(r["count_targeted"], 22);
    assert_eq!(r["count_sent"], 15);
    assert_eq!(r["count_accepted"], 12);
    assert_eq!(r["count_bounce"], 3);
    assert_eq!(r["count_admin_bounce"], 3);
    assert_eq!(v["links"][0]["rel"], "deliverability");
    // `to` is exclusive at 1min: 10:00–10:06 sees the first minute only.
    let v = ok(
        View::Summary,
        &[
            ("from", "2026-12-07T10:00"),
            ("to", "2026-12-07T10:07"),
            ("metrics", "count_injected,count_bounce"),
        ],
    );
    assert_eq!(v["results"][0]["count_injected"], 10);
    assert_eq!(v["results"][0]["count_bounce"], 0);
    // 5min widens it to 10:10.
    let v = ok(
        View::Summary,
        &[
            ("from", "2026-12-07T10:00"),
            ("to", "2026-12-07T10:07"),
            ("precision", "5min"),
            ("metrics", "count_bounce"),
        ],
    );
    assert_eq!(v["results"][0]["count_bounce"], 3);
    // A timezone moves the window: 05:00-05:00 is 10:00Z.
    let v = ok(
        View::Summary,
        &[
            ("from", "2026-12-07T05:00"),
            ("timezone", "-05:00"),
            ("metrics", "count_injected"),
        ],
    );
    assert_eq!(v["results"][0]["count_injected"], 19);
}

#[test]
fn groupings_filters_and_tenants() {
    let v = ok(
        View::By(Dim::Domain),
        &[
            ("from", "2026-12-07T10:00"),
            ("metrics", "count_injected,count_delivered"),
        ],
    );
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0]["domain"], "gmail.test");
    assert_eq!(r[0]["count_injected"], 14);
    assert_eq!(r[1]["domain"], "yahoo.test");
    // order_by and limit.
    let v = ok(
        View::By(Dim::Campaign),
        &[
            ("from", "2026-12-07T10:00"),
            ("metrics", "count_injected,count_policy_rejection"),
            ("order_by", "count_policy_rejection"),
            ("limit", "1"),
        ],
    );
    assert_eq!(v["results"].as_array().unwrap().len(), 1);
    assert_eq!(v["results"][0]["campaign_id"], "fall");
    // The primary account is subaccount 0.
    let v = ok(
        View::By(Dim::Tenant),
        &[("from", "2026-12-07T10:00"), ("metrics", "count_injected")],
    );
    assert_eq!(v["results"][0]["subaccount_id"], "acme");
    assert_eq!(v["results"][1]["subaccount_id"], 0);
    // Simple filters, with another delimiter.
    let v = ok(
        View::Summary,
        &[
            ("from", "2026-12-07T10:00"),
            ("metrics", "count_injected"),
            ("delimiter", ";"),
            ("sending_ips", "192.0.2.2;192.0.2.9"),
        ],
    );
    assert_eq!(v["results"][0]["count_injected"], 5);
    let v = ok(
        View::Summary,
        &[
            ("from", "2026-12-07T10:00"),
            ("metrics", "count_injected"),
            ("subaccounts", "0"),
        ],
    );
    assert_eq!(v["results"][0]["count_injected"], 4);
    // A tenant's key sees its tenant only, whatever it filters.
    let pairs = params(&[("from", "2026-12-07T10:00"), ("metrics", "count_injected")]);
    let v = run(
        &store(),
        View::Summary,
        &Params::new(&pairs),
        Some("acme"),
        NOW,
    )
    .unwrap();
    assert_eq!(v["results"][0]["count_injected"], 15);
    // Advanced filters: AND across groupings, OR within one; simple ones ignored.
    let filters = r#"{"groupings":[{"OR":{"domains":{"eq":["yahoo.test"]},"campaigns":{"like":["pri"]}}},{"AND":{"sending_domains":{"notLike":["zeta"]}}}]}"#;
    let v = ok(
        View::Summary,
        &[
            ("from", "2026-12-07T10:00"),
            ("metrics", "count_injected"),
            ("query_filters", filters),
            ("domains", "nothing.test"),
        ],
    );
    assert_eq!(v["results"][0]["count_injected"], 15);
}

#[test]
fn time_series_has_every_bucket_in_the_requests_zone() {
    let v = ok(
        View::TimeSeries,
        &[
            ("from", "2026-12-07T10:00"),
            ("to", "2026-12-07T10:45"),
            ("precision", "15min"),
            ("metrics", "count_injected"),
        ],
    );
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 3);
    assert_eq!(r[0]["ts"], "2026-12-07T10:00:00+00:00");
    assert_eq!(r[0]["count_injected"], 10);
    assert_eq!(r[1]["count_injected"], 5);
    assert_eq!(r[2]["count_injected"], 4);
    let v = ok(
        View::TimeSeries,
        &[
            ("from", "2026-12-07T04:00"),
            ("to", "2026-12-07T06:00"),
            ("precision", "hour"),
            ("timezone", "-05:00"),
            ("metrics", "count_injected"),
        ],
    );
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[1]["ts"], "2026-12-07T05:00:00-05:00");
    assert_eq!(r[1]["count_injected"], 19);
    // Days, weeks (from Monday) and months are UTC's.
    let v = ok(
        View::TimeSeries,
        &[
            ("from", "2026-12-01T00:00"),
            ("to", "2026-12-08T00:00"),
            ("precision", "week"),
            ("metrics", "count_injected"),
        ],
    );
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["ts"], "2026-11-30T00:00:00+00:00");
    assert_eq!(r[0]["count_injected"], 100);
    assert_eq!(r[1]["ts"], "2026-12-07T00:00:00+00:00");
    assert_eq!(r[1]["count_injected"], 19);
    let v = ok(
        View::TimeSeries,
        &[
            ("from", "2026-11-15T00:00"),
            ("precision", "month"),
            ("metrics", "count_injected"),
        ],
    );
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[1]["ts"], "2026-12-01T00:00:00+00:00");
    assert_eq!(r[1]["count_injected"], 119);
}

#[test]
fn lists_name_the_values_with_tallies() {
    let v = ok(View::List(Dim::Campaign), &[]);
    assert_eq!(v["results"]["campaigns"], json!(["fall", "spring"]));
    let v = ok(View::List(Dim::Domain), &[("match", "YAH")]);
    assert_eq!(v["results"]["domains"], json!(["yahoo.test"]));
    let v = ok(View::List(Dim::Template), &[("from", "2026-12-07T10:15")]);
    assert_eq!(v["results"]["templates"], json!(["promo", "welcome"]));
    let v = ok(View::List(Dim::IpPool), &[("limit", "1")]);
    assert_eq!(v["results"]["ip-pools"], json!(["p1"]));
}

#[test]
fn bad_requests_say_what_is_wrong() {
    let m = ("metrics", "count_injected");
    assert!(err(View::Summary, &[m]).contains("from is required"));
    assert!(err(View::Summary, &[("from", "2026-12-07")]).contains("YYYY-MM-DDTHH:MM"));
    assert!(err(View::Summary, &[("from", "2026-13-07T10:00"), m]).contains("from"));
    assert!(err(View::Summary, &[("from", "2026-12-07T10:00")]).contains("metrics is required"));
    assert!(
        err(
            View::Summary,
            &[("from", "2026-12-07T10:00"), ("metrics", "count_bogus")]
        )
        .contains("unknown metric `count_bogus`")
    );
    assert!(
        err(
            View::Summary,
            &[
                ("from", "2026-12-07T10:00"),
                ("metrics", "count_inbox_seed")
            ]
        )
        .contains("add-on")
    );
    assert!(
        err(
            View::Summary,
            &[("from", "2026-12-07T10:00"), ("to", "2026-12-07T09:00"), m]
        )
        .contains("later")
    );
    assert!(
        err(
            View::Summary,
            &[("from", "2026-12-01T10:00"), ("precision", "1min"), m]
        )
        .contains("24 hours")
    );
    assert!(
        err(
            View::Summary,
            &[("from", "2026-12-07T10:00"), ("precision", "12hr"), m]
        )
        .contains("precision `12hr`")
    );
    assert!(
        err(
            View::Summary,
            &[
                ("from", "2026-12-07T10:00"),
                ("timezone", "America/New_York"),
                m
            ]
        )
        .contains("fixed offsets")
    );
    assert!(
        err(
            View::Summary,
            &[
                ("from", "2026-12-07T10:00"),
                ("timezone", "+05:30"),
                ("precision", "hour"),
                m
            ]
        )
        .contains("whole hours")
    );
    assert!(
        err(
            View::By(Dim::Domain),
            &[("from", "2026-12-07T10:00"), m, ("limit", "0")]
        )
        .contains("limit")
    );
    assert!(
        err(
            View::By(Dim::Domain),
            &[("from", "2026-12-07T10:00"), m, ("order_by", "x")]
        )
        .contains("order_by")
    );
    assert!(
        err(
            View::Summary,
            &[
                ("from", "2026-12-07T10:00"),
                m,
                ("mailbox_providers", "gmail")
            ]
        )
        .contains("mailbox providers")
    );
    for filters in [
        "nope",
        "[]",
        r#"{"groupings":{}}"#,
        r#"{"groupings":[{"XOR":{}}]}"#,
        r#"{"groupings":[{"AND":{"colors":{"eq":["x"]}}}]}"#,
        r#"{"groupings":[{"AND":{"domains":{"eq":[]}}}]}"#,
        r#"{"groupings":[{"AND":{"domains":{"like":["ab"]}}}]}"#,
        r#"{"groupings":[{"AND":{"domains":{"near":["abc"]}}}]}"#,
        r#"{"groupings":[], "extra": 1}"#,
    ] {
        let e = ask(
            View::Summary,
            &[("from", "2026-12-07T10:00"), m, ("query_filters", filters)],
            None,
        )
        .unwrap_err();
        assert_eq!(e.message, "invalid query_filters", "{filters}");
    }
    // Years that would overflow, and windows of too many points.
    assert!(err(View::Summary, &[("from", "99999999999-01-01T00:00"), m]).contains("from"));
    assert!(
        err(
            View::Summary,
            &[
                ("from", "2026-12-07T10:00"),
                ("to", "922337203685477-01-01T00:00"),
                m
            ]
        )
        .contains("to")
    );
    assert!(
        err(
            View::TimeSeries,
            &[("from", "0001-01-01T00:00"), ("precision", "day"), m]
        )
        .contains("points")
    );
    // The default precision is the finest the window allows.
    let v = ok(View::Summary, &[("from", "2026-11-01T00:00"), m]);
    assert_eq!(v["results"][0]["count_injected"], 119);
}
