//! One core's services, put together: the shard's own state, its delivery and its
//! transmission jobs. Ingress (SMTP and HTTP) and the runtime work through
//! [`ShardServices`]; the services below it each hold only what they use, so that delivery
//! knows nothing of jobs and neither knows ingress.

use std::rc::Rc;

use crate::delivery::Dispatcher;
use crate::delivery::tls::ClientTls;
use crate::jobs::Jobs;
use crate::shard::Shard;

#[derive(Debug)]
pub struct ShardServices {
    pub shard: Rc<Shard>,
    pub delivery: Rc<Dispatcher>,
    pub jobs: Rc<Jobs>,
}

impl ShardServices {
    /// The services of `shard`, delivering with the process's client TLS.
    pub fn new(shard: Rc<Shard>, client_tls: ClientTls) -> Rc<ShardServices> {
        let delivery = Rc::new(Dispatcher::new(shard.clone(), client_tls));
        let jobs = Rc::new(Jobs::new(shard.clone(), delivery.clone()));
        Rc::new(ShardServices {
            shard,
            delivery,
            jobs,
        })
    }

    /// Starts the shard's delivery maintainer and inbox.
    pub fn start(&self) {
        glommio::spawn_local(crate::delivery::maintainer::run(self.delivery.clone())).detach();
        glommio::spawn_local(crate::inbox::run(self.delivery.clone(), self.jobs.clone())).detach();
        glommio::spawn_local(crate::delivery::tlsrpt::run(self.delivery.clone())).detach();
    }
}

#[cfg(test)]
mod testing {
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;
    use std::sync::Arc;

    use gannet_spool::{SimStorage, Spool, SpoolConfig};

    use super::ShardServices;
    use crate::delivery::tls::ClientTls;
    use crate::events::{EventFiles, Limits};
    use crate::io::Shutdown;
    use crate::metrics::ShardMetrics;
    use crate::policy::rules::RulesPolicy;
    use crate::shard::{SessionLimits, Shard, Shared};
    use crate::storage::ShardStorage;
    use gannet_core::auth::Credentials;
    use gannet_core::config::Config;
    use gannet_core::message::MetaHeaders;

    impl ShardServices {
        /// A shard of its own (one of one) on the simulated disk `storage`, with the default
        /// configuration, its events and stored items under `events_dir`. For the in-process
        /// tests of other modules too.
        pub(crate) fn on_sim(
            events_dir: &std::path::Path,
            storage: SimStorage,
            spool_config: SpoolConfig,
        ) -> Rc<ShardServices> {
            let mut config = Config::default();
            config.server.hostname = "gannet.test".into();
            let (spool, _) = Spool::open(ShardStorage::Sim(storage), spool_config).unwrap();
            let events = Arc::new(
                EventFiles::open(
                    events_dir,
                    Limits {
                        file_bytes_max: 1 << 20,
                        files_kept: 1,
                        unshipped_bytes_max: u64::MAX,
                    },
                )
                .unwrap(),
            );
            let live = Arc::new(crate::live::Live::new(
                gannet_core::shaping::ShapingTable::new(&config.delivery),
                crate::dkim::Signers::load(&Default::default()).unwrap(),
            ));
            let hose = crate::hose::Hose::new(
                events_dir,
                vec![events.clone()],
                1,
                crate::hose::HoseSettings::from_config(&config.events),
                live.clone(),
            )
            .unwrap();
            glommio::spawn_local(spool.clone().run_committer()).detach();
            let shared = Arc::new(Shared {
                api_keys: Default::default(),
                tracking_key: crate::merge::tracking::TrackingKey::new(
                    b"test tracking key, 32 bytes long",
                ),
                tracking_base_url: String::new(),
                store: Arc::new(crate::merge::store::Store::open(events_dir).unwrap()),
                credentials: Credentials::new([]),
                tls: None,
                policy: Box::new(RulesPolicy::new(&config.policy)),
                meta_headers: MetaHeaders {
                    tenant: "X-Gannet-Tenant".into(),
                    campaign: "X-Gannet-Campaign".into(),
                    pool: "X-Gannet-Pool".into(),
                    expires: "X-Gannet-Expires".into(),
                },
                metrics: vec![Arc::new(ShardMetrics::default())],
                mesh: crate::mesh::Mesh::new(1, 16),
                stop: Arc::new(crate::io::StopBell::new(1)),
                sessions: Arc::new(SessionLimits::new(100, 100)),
                live,
                cluster: None,
                limits: Default::default(),
                warmup: crate::warmup::Warmup::load(&config.delivery, events_dir, 0).unwrap(),
                hose: Arc::new(hose),
                suppressions: crate::suppression::Suppressions::open(events_dir, 1000).unwrap(),
                transmissions: crate::registry::Transmissions::open(events_dir).unwrap(),
                config,
            });
            let dkim = (
                shared.live.generation(),
                shared.live.snapshot().dkim.clone(),
            );
            let shard = Rc::new(Shard {
                id: 0,
                metrics: shared.metrics[0].clone(),
                shared,
                spool,
                events,
                shutdown: Shutdown::default(),
                http_in_flight: Default::default(),
                dkim: RefCell::new(dkim),
                sessions_active: Cell::new(0),
                auth_cache: Default::default(),
                read_buffers: Default::default(),
                script: Default::default(),
            });
            ShardServices::new(shard, ClientTls::new())
        }
    }
}
