//! Why the replicator stops or restarts ([`RunError`]). What to do about each
//! error is [`crate::recovery`]'s one mapping; this module only names them,
//! so that the mapping and the wiring in [`crate::run`] both depend on it and
//! not on each other.

use sluice_broker::topology;

use crate::catalog::CatalogError;
use crate::packager::StreamReadError;
use crate::pg::PgError;
use crate::replication::ReplicationError;
use crate::slot::SlotError;
use crate::snapshot;
use crate::stream::StreamError;

/// Why the replicator stopped or must restart.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    NatsConnect(#[from] sluice_broker::connect::ConnectError),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error(transparent)]
    StreamRead(#[from] StreamReadError),
    #[error("cannot list the stream's control subjects (resync progress records)")]
    ControlSubjects {
        #[source]
        source: async_nats::jetstream::stream::InfoError,
    },
    #[error("cannot publish to the stream")]
    Publish(#[from] sluice_broker::publish::PublishError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("publication {publication} has no table that can be replicated")]
    NothingToReplicate { publication: String },
    #[error("cannot serve metrics on {listen}")]
    Metrics {
        listen: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot create spill files for streamed transactions in {} (replicator.spill_dir)",
        dir.display()
    )]
    SpillDir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the metrics recorder")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
}
