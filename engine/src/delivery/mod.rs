//! Delivery: the shard's delivery loop ([`dispatcher`]), the SMTP client
//! ([`client`]) and its TLS ([`tls`]), and bounce classification ([`bounce`]).

pub mod bounce;
pub mod client;
pub mod dispatcher;
pub mod tls;

#[cfg(test)]
mod tests;
