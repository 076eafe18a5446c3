//! `[cluster]`: what several gannet nodes sending from the same IP ranges share
//! through one Redis — throttles kept as GCRA state in Redis and leased a batch of
//! tokens at a time (`engine/src/cluster.rs`).

use serde::{Deserialize, Deserializer};

use super::Bounded;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The shared Redis (`redis://[user:password@]host[:port][/db]`); empty: this
    /// node shares nothing.
    pub redis_url: RedisUrl,
    /// `redis_url` is a node of a Redis Cluster (the others are found from it):
    /// each shared limit is one key, spread over the cluster's slots.
    pub redis_cluster: bool,
    /// What a throttle does while Redis cannot be reached.
    pub fallback: Fallback,
    /// How long one Redis call (or connecting) may take before Redis counts as down.
    pub redis_timeout_ms: Bounded<10, 10_000>,
    /// The longest a lease is planned for: a node leases about its rate over this
    /// long, so that Redis is asked a few times a second per throttle at most.
    pub lease_window_ms: Bounded<10, 10_000>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: RedisUrl::default(),
            redis_cluster: false,
            fallback: Fallback::Open,
            redis_timeout_ms: Bounded(500),
            lease_window_ms: Bounded(250),
        }
    }
}

/// While Redis is down: `open` sends at this node's share of each limit (the limit
/// divided by the nodes last seen), `closed` sends nothing a shared throttle holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    Open,
    Closed,
}

/// A `redis://` URL, checked when the file is read (the empty string: none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisUrl(pub String);

impl RedisUrl {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Why `url` is not a Redis URL gannet takes, if it is not.
    pub fn check(url: &str) -> Result<(), String> {
        if url.is_empty() {
            return Ok(());
        }
        if url.starts_with("rediss://") {
            return Err(format!(
                "`{url}`: Redis over TLS (rediss://) is not supported yet; use redis:// on a trusted network"
            ));
        }
        let Some(rest) = url.strip_prefix("redis://") else {
            return Err(format!(
                "`{url}` is not a redis:// URL (redis://host:6379/0)"
            ));
        };
        let authority = rest.split('/').next().unwrap_or("");
        if let (_, _, Some(0)) = super::net::split_authority(url, authority)? {
            return Err(format!("`0` in `{url}` is not a port"));
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RedisUrl, D::Error> {
        let url = String::deserialize(d)?;
        RedisUrl::check(&url).map_err(serde::de::Error::custom)?;
        Ok(RedisUrl(url))
    }
}

impl ClusterConfig {
    /// Checks what spans keys: a Redis Cluster needs a node to start from, and has
    /// only database 0. Answers the key and why.
    pub fn check(&self) -> Result<(), (String, String)> {
        if !self.redis_cluster {
            return Ok(());
        }
        let url = &self.redis_url.0;
        if url.is_empty() {
            return Err((
                "cluster.redis_cluster".into(),
                "needs redis_url: a node of the Redis Cluster (the others are found from it)"
                    .into(),
            ));
        }
        let db = url
            .strip_prefix("redis://")
            .and_then(|rest| rest.split_once('/'))
            .map_or("", |(_, db)| db);
        if !db.is_empty() && db != "0" {
            return Err((
                "cluster.redis_url".into(),
                format!("`{url}`: a Redis Cluster has only database 0"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_are_checked() {
        for good in [
            "",
            "redis://127.0.0.1",
            "redis://127.0.0.1:6379/0",
            "redis://:secret@redis.example:6380",
            "redis://user:pw@[::1]:6379",
        ] {
            assert_eq!(RedisUrl::check(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("http://h:6379", "not a redis:// URL"),
            ("rediss://h", "not supported"),
            ("redis://", "no host"),
            ("redis://:pw@/0", "no host"),
            ("redis://h:0", "not a port"),
            ("redis://h:99999", "not a port"),
            ("redis://[::1]:x", "not a port"),
        ] {
            let err = RedisUrl::check(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn a_bad_cluster_section_names_its_key_and_line() {
        let text = "[server]\nhostname = \"h.test\"\n[cluster]\nredis_url = \"http://h:6379\"\n";
        let err = crate::config::Config::parse(text, "g.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("g.toml:4:")
                && err.contains("cluster.redis_url")
                && err.contains("redis://"),
            "{err}"
        );
        let err = crate::config::Config::parse("[cluster]\nfallback = \"maybe\"\n", "g.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cluster.fallback") && err.contains("open"),
            "{err}"
        );
        let ok = crate::config::Config::parse(
            "[cluster]\nredis_url = \"redis://10.0.0.5:6379/0\"\nfallback = \"closed\"\n",
            "g.toml",
        )
        .unwrap();
        assert_eq!(ok.cluster.fallback, Fallback::Closed);
        let err = crate::config::Config::parse("[cluster]\nredis_cluster = true\n", "g.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("g.toml:2:") && err.contains("needs redis_url"),
            "{err}"
        );
        let err = crate::config::Config::parse(
            "[cluster]\nredis_cluster = true\nredis_url = \"redis://h:7000/3\"\n",
            "g.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("g.toml:3:") && err.contains("only database 0"),
            "{err}"
        );
        assert_eq!(ok.cluster.lease_window_ms.get(), 250);
    }
}
