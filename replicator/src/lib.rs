//! sluice replicator: reads a Postgres publication through a logical
//! replication slot (pgoutput), turns every committed change into protobuf
//! packages and publishes them to NATS JetStream with deterministic dedup IDs.
//!
//! Modules, one job each, by layer (a module only uses the layers above it
//! and its own, except that [`replication`] asks [`recovery`] whether a
//! failed host is worth trying the next one):
//!
//! Reading Postgres:
//! - [`replication`]: the streaming-replication connection (protocol, auth,
//!   commands, CopyBoth).
//! - [`pg`]: ordinary SQL connections and slot inspection.
//! - [`catalog`]: table and type metadata from the Postgres catalog.
//! - [`backlog`]: a large backlog read through SQL before streaming.
//! - [`pgoutput`]: decoder of pgoutput messages (untrusted bytes, never panics).
//! - [`values`]: typed conversion of pgoutput's text values into wire values.
//!
//! Turning changes into packages:
//! - [`packager`]: rows into packages, chain positions, dedup IDs, and where
//!   each chain resumes after a restart.
//! - [`publish`]: commit marks and heartbeats handed to the publisher.
//! - [`snapshot`]: every row of a table as of an exported snapshot.
//! - [`stream`]: the streaming loop (LSN confirmation, pgoutput → rows,
//!   resyncs on request).
//!
//! Running:
//! - [`slot`]: what to do with the slot at start-up (resume, create, recreate).
//! - [`error`]: why the replicator stops or restarts.
//! - [`recovery`]: what to do about each failure (retry, resync or fail a
//!   table, stop), decided in one place; the replication connection also
//!   asks it whether to try the next host.
//! - [`run`]: wiring of `sluice-replicator run` and its restart supervisor.
//! - [`status`], [`control`]: the `status` and `resync` commands.
//! - [`metrics`]: metric names.

pub mod backlog;
pub mod catalog;
pub mod control;
pub mod error;
pub mod metrics;
pub mod packager;
pub mod pg;
pub mod pgoutput;
pub mod publish;
pub mod recovery;
pub mod replication;
pub mod run;
pub mod slot;
pub mod snapshot;
pub mod status;
pub mod stream;

/// A failpoint's crash: exits at once, as a kill would stop the replicator
/// (nothing flushed or confirmed). Only built with the `failpoints` feature
/// and only reached when `FAILPOINTS` names the point
/// (`integration/tests/crash_points.rs`).
#[cfg(feature = "failpoints")]
pub(crate) fn crash_here<T>() -> T {
    eprintln!("failpoint: exiting");
    std::process::exit(86)
}
