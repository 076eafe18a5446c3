//! Ingress: the ways mail enters gannet (SMTP today; the HTTP injection API later).

pub mod smtp;
