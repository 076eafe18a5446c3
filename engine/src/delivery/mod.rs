//! Delivery: the SMTP client ([`client`]) and its TLS ([`tls`]). The queues that feed
//! it, routing and shaping are built on these (the delivery issue); until they land
//! the client is exercised only by its tests against real servers.
#![cfg_attr(not(test), allow(dead_code))]

pub mod client;
pub mod tls;

#[cfg(test)]
mod tests;
