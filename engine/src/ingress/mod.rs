//! Ingress: the ways mail and requests enter gannet — the ESMTP server ([`smtp`])
//! and the HTTP server ([`http`]: SparkPost's transmissions, templates and recipient
//! lists, KumoMTA's inject API, tracking links, the admin API, metrics).

pub mod http;
pub mod smtp;
