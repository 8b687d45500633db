//! sluice replicator: reads a Postgres publication through a logical
//! replication slot (pgoutput), turns every committed change into protobuf
//! packages and publishes them to NATS JetStream with deterministic dedup IDs.
//!
//! Modules, one job each:
//! - [`replication`]: the streaming-replication connection (protocol, auth, CopyBoth).
//! - [`pgoutput`]: decoder of pgoutput messages (untrusted bytes, never panics).
//! - [`catalog`]: table and type metadata from the Postgres catalog.
//! - [`values`]: typed conversion of pgoutput's text values into wire values.
//! - [`packager`]: rows into packages, chain positions, dedup IDs.
//! - [`backlog`]: a large backlog read through SQL before streaming.

pub mod backlog;
pub mod catalog;
pub mod control;
pub mod metrics;
pub mod packager;
pub mod pg;
pub mod pgoutput;
pub mod replication;
pub mod run;
pub mod snapshot;
pub mod status;
pub mod stream;
pub mod values;
