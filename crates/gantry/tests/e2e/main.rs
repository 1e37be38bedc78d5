//! End-to-end tests: the real `gantry` binary, real processes, real sockets on 127.0.0.1.
#![allow(clippy::unwrap_used)]

mod common;

mod admin_api;
mod bus;
mod cli_and_spec;
mod config;
mod consistency;
mod deploy;
mod discovery;
mod gateway;
mod hardening;
mod identity;
mod observability;
mod protocols;
mod registry;
mod resilience;
mod routing;
mod shop;
mod store;
mod supervisor;
mod telemetry;
