//! `/api/v1/metrics`: SparkPost's Metrics API over the hose's tally of gannet's own
//! events (`hose::tally`; `query.rs` there says how each metric is computed).
//!
//! - `GET /deliverability`: the summary; `/deliverability/<domain | campaign |
//!   template | sending-ip | ip-pool | sending-domain | subaccount>`: grouped by
//!   it (`order_by`, `limit`); `/deliverability/time-series`: per bucket of
//!   `precision`.
//! - `GET /campaigns`, `/domains`, `/templates`, `/sending-ips`, `/ip-pools`,
//!   `/sending-domains`, `/subaccounts`: the values with tallies (`match`, `limit`,
//!   `from`/`to`); `GET /` the links.
//!
//! A tenant's key sees its own tenant's mail only. A query scans the tallies on a
//! thread of its own, never on the shard.

use std::rc::Rc;

use super::Reply;
use crate::hose::tally::query::{self, Params, View};
use crate::shard::Shard;

/// Handles `rest` below `/api/v1/metrics`.
pub async fn handle(
    shard: &Rc<Shard>,
    tenant: Option<&str>,
    method: &hyper::Method,
    rest: &str,
    query: &str,
) -> Reply {
    if method != hyper::Method::GET {
        return super::method_not_allowed();
    }
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let view = match segments.as_slice() {
        [] => return Reply::json(200, query::discovery().to_string()),
        ["deliverability"] => View::Summary,
        ["deliverability", "time-series"] => View::TimeSeries,
        ["deliverability", by] => match query::by_path(by) {
            Some(dim) => View::By(dim),
            None => return not_found(rest),
        },
        [list] => match query::list_path(list) {
            Some(dim) => View::List(dim),
            None => return not_found(rest),
        },
        _ => return not_found(rest),
    };
    let Some(tally) = shard.shared.hose.tally.clone() else {
        return Reply::error(
            404,
            "1101",
            "invalid URI",
            "the Metrics API is off (events.metrics.enabled = false)",
        );
    };
    let pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (
                crate::admin::percent_decode(key),
                crate::admin::percent_decode(value),
            )
        })
        .collect();
    let tenant = tenant.map(str::to_string);
    let now = gannet_core::clock::unix_ms();
    let answer = crate::io::on_thread("gannet-metrics", move || {
        tally.read(|store| query::run(store, view, &Params::new(&pairs), tenant.as_deref(), now))
    })
    .await;
    match answer {
        Some(Ok(value)) => Reply::json(200, value.to_string()),
        Some(Err(invalid)) => Reply::error(400, "1200", invalid.message, &invalid.description),
        None => Reply::error(500, "", "the query could not be run", "no thread for it"),
    }
}

fn not_found(rest: &str) -> Reply {
    Reply::error(
        404,
        "1101",
        "invalid URI",
        &format!("no metrics endpoint at /api/v1/metrics{rest}"),
    )
}
