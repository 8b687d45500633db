//! The contract both sluice binaries share: configuration, JetStream topology
//! (stream, subjects, dedup IDs) and publishing with bounded in-flight acks.

pub mod config;
pub mod connect;
pub mod publish;
pub mod telemetry;
pub mod topology;
