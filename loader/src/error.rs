//! The loader's errors, by where they end: a batch ([`ApplyError`]) or the
//! run ([`RunError`]). What to do about each is [`crate::recovery`]'s one
//! mapping; this module only names them, so that the mapping and the code
//! that raises them both depend on it and not on each other.

use crate::clickhouse::Error as ChError;

/// A batch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] ChError),
    #[error("clickhouse client")]
    Client(#[source] crate::clickhouse::ClientError),
    #[error("cannot publish a dead letter")]
    DeadLetter(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Why the loader stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    NatsConnect(#[from] sluice_broker::connect::ConnectError),
    #[error("cannot create the durable consumer {consumer} on stream {stream}")]
    Consumer {
        stream: String,
        consumer: String,
        #[source]
        source: async_nats::jetstream::stream::ConsumerError,
    },
    #[error("cannot reset the durable consumer {consumer} to its first unacked message")]
    ConsumerReset {
        consumer: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot fetch a batch from stream {stream}")]
    Fetch {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot acknowledge the batch")]
    Ack(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Share(#[from] crate::share::ShareError),
    #[error("cannot read the state or the subjects of stream {stream}")]
    StreamInfo {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot find where to read table {table} again in stream {stream}")]
    CatchUp {
        stream: String,
        table: sluice_broker::TableName,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("cannot serve metrics on {listen}")]
    Metrics {
        listen: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the metrics recorder")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
}
