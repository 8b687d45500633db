//! `sluice-loader dead-letters`: the source's dead-letter stream
//! (`<stream>_DEAD_LETTERS`, README "Dead letters") listed, shown, replayed
//! and purged.
//!
//! `list` and `show` only read (single-message gets, which the loader's NATS
//! user may do). `replay` writes a letter's rows into ClickHouse as the
//! loader would have: each row keeps its version, so a newer version already
//! there wins and replaying twice changes nothing (ARCHITECTURE.md invariant
//! 2); a letter that does not decode, or is no row package, cannot be
//! replayed. `purge` deletes letters from the stream: the loader's
//! least-privilege user may not, an operator's user may.

use std::time::Duration;

use async_nats::jetstream::{self, stream::Stream};
use serde::Serialize;
use sluice_broker::config::Config;
use sluice_broker::{TableName, topology};
use sluice_proto::v1;

use crate::clickhouse::schema::{TargetTable, ensure_table};
use crate::clickhouse::{Error as ChError, InsertBuilder, ToastRequest, fetch_current};

/// Why a dead-letter command failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(transparent)]
    NatsConnect(#[from] sluice_broker::connect::ConnectError),
    #[error(
        "the dead-letter stream {stream} cannot be read (it appears with the replicator's first start)"
    )]
    Stream {
        stream: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("dead letter {sequence} cannot be read")]
    Read {
        sequence: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("no dead letter {sequence} in {stream}")]
    Missing { stream: String, sequence: u64 },
    #[error("dead letter {sequence} cannot be replayed: {reason}")]
    NotReplayable { sequence: u64, reason: String },
    #[error("clickhouse client")]
    Client(#[source] crate::clickhouse::ClientError),
    #[error("replaying dead letter {sequence}")]
    Replay {
        sequence: u64,
        #[source]
        source: ChError,
    },
    #[error(
        "deleting dead letter {sequence} (the loader's own NATS user may not: use an operator's)"
    )]
    Delete {
        sequence: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// One dead letter, as `list` and `show` print it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Letter {
    /// Its sequence in the dead-letter stream: what `show`, `replay` and
    /// `purge` take.
    pub sequence: u64,
    /// When it was dead-lettered (RFC 3339).
    pub time: String,
    /// `decode`, `unpositioned` or `insert` (`sluice_dead_letters_total`).
    pub reason: String,
    pub error: String,
    /// The subject it was published on, and its table.
    pub subject: String,
    pub table: Option<String>,
    /// Its sequence in the data stream.
    pub stream_sequence: Option<u64>,
    /// What the payload decodes to (`show`), or why it does not.
    pub package: Option<String>,
    #[serde(skip)]
    payload: bytes::Bytes,
    #[serde(skip)]
    encoding: Option<String>,
}

impl Letter {
    /// The package the letter holds.
    fn decode(&self) -> Result<v1::Package, String> {
        sluice_proto::decode(&self.payload, self.encoding.as_deref())
            .map_err(|e| sluice_broker::error_chain(&e))
    }
}

/// One line: `kind generation/sequence N rows, columns …`.
fn describe(package: &v1::Package) -> String {
    let columns: Vec<&str> = package
        .relation
        .iter()
        .flat_map(|r| r.columns.iter().map(|c| c.name.as_str()))
        .collect();
    let position = package.position.map_or("-".to_owned(), |p| {
        format!("{}/{}", p.generation, p.sequence)
    });
    format!(
        "{:?} at {position}, commit_lsn {}, {} rows, columns ({})",
        package.kind(),
        crate::status::format_lsn(package.commit_lsn),
        sluice_proto::values::copy::row_count(package),
        columns.join(", ")
    )
}

/// How long one read may take: a user without permission gets no answer.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

async fn dead_letter_stream(config: &Config) -> Result<Stream, DeadLetterError> {
    let nats = sluice_broker::connect::connect(&config.nats, "sluice-loader dead-letters").await?;
    let name = topology::dead_letter_stream_name(&config.stream_name());
    let stream_error = |source: Box<dyn std::error::Error + Send + Sync>| DeadLetterError::Stream {
        stream: name.clone(),
        source,
    };
    tokio::time::timeout(READ_TIMEOUT, jetstream::new(nats).get_stream(&name))
        .await
        .map_err(|e| stream_error(Box::new(e)))?
        .map_err(|e| stream_error(Box::new(e)))
}

async fn read_one(
    config: &Config,
    stream: &Stream,
    sequence: u64,
) -> Result<Option<Letter>, DeadLetterError> {
    let read_error = |source: Box<dyn std::error::Error + Send + Sync>| DeadLetterError::Read {
        sequence,
        source,
    };
    let message = match tokio::time::timeout(READ_TIMEOUT, stream.get_raw_message(sequence))
        .await
        .map_err(|e| read_error(Box::new(e)))?
    {
        Ok(message) => message,
        // Deleted (replayed and purged, or aged out).
        Err(error) if error.to_string().contains("not found") => return Ok(None),
        Err(error) => return Err(read_error(Box::new(error))),
    };
    let header = |name: &str| {
        message
            .headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    let subject = header("Sluice-Original-Subject");
    Ok(Some(Letter {
        sequence,
        time: message.time.to_string(),
        reason: header("Sluice-Dead-Letter-Reason"),
        error: header("Sluice-Dead-Letter-Error"),
        table: topology::table_of_subject(&config.source, &subject).map(|t| t.to_string()),
        stream_sequence: header("Sluice-Stream-Sequence").parse().ok(),
        subject,
        package: None,
        encoding: message
            .headers
            .get(sluice_proto::ENCODING_HEADER)
            .map(|v| v.as_str().to_owned()),
        payload: message.payload,
    }))
}

/// Every dead letter in the stream, oldest first.
pub async fn list(config: &Config) -> Result<Vec<Letter>, DeadLetterError> {
    let mut stream = dead_letter_stream(config).await?;
    let name = topology::dead_letter_stream_name(&config.stream_name());
    let info = stream
        .info()
        .await
        .map_err(|e| DeadLetterError::Stream {
            stream: name,
            source: Box::new(e),
        })?
        .state
        .clone();
    let mut letters = Vec::new();
    if info.messages == 0 {
        return Ok(letters);
    }
    for sequence in info.first_sequence..=info.last_sequence {
        if let Some(letter) = read_one(config, &stream, sequence).await? {
            letters.push(letter);
        }
    }
    Ok(letters)
}

/// One dead letter with what its payload decodes to.
pub async fn show(config: &Config, sequence: u64) -> Result<Letter, DeadLetterError> {
    let mut letter = fetch(config, sequence).await?;
    letter.package = Some(match letter.decode() {
        Ok(package) => describe(&package),
        Err(error) => format!("does not decode: {error}"),
    });
    Ok(letter)
}

/// Dead letter `sequence`, which must exist.
async fn fetch(config: &Config, sequence: u64) -> Result<Letter, DeadLetterError> {
    let stream = dead_letter_stream(config).await?;
    read_one(config, &stream, sequence)
        .await?
        .ok_or_else(|| DeadLetterError::Missing {
            stream: topology::dead_letter_stream_name(&config.stream_name()),
            sequence,
        })
}

/// Writes the rows of dead letter `sequence` into ClickHouse (its table
/// created or evolved to the letter's relation first); returns the table and
/// the number of rows. The letter stays in the stream: `purge` removes it.
pub async fn replay(config: &Config, sequence: u64) -> Result<(TableName, usize), DeadLetterError> {
    let letter = fetch(config, sequence).await?;
    let not_replayable = |reason: String| DeadLetterError::NotReplayable { sequence, reason };
    let mut package = letter
        .decode()
        .map_err(|e| not_replayable(format!("it does not decode: {e}")))?;
    sluice_proto::values::copy::materialize(&mut package).map_err(|e| {
        not_replayable(format!(
            "its COPY text does not decode: {}",
            sluice_broker::error_chain(&e)
        ))
    })?;
    if !matches!(package.kind(), v1::Kind::Changes | v1::Kind::Snapshot) {
        return Err(not_replayable(format!(
            "it is a {:?} package, not rows",
            package.kind()
        )));
    }
    let relation = package
        .relation
        .clone()
        .ok_or_else(|| not_replayable("it has no relation".to_owned()))?;
    let table = TableName::new(&package.schema, &package.table);
    let replay_error = |source| DeadLetterError::Replay { sequence, source };
    let target = TargetTable::from_relation(
        &config.clickhouse_database(),
        &table.schema,
        &table.name,
        &relation,
    )
    .map_err(replay_error)?;
    let ch = crate::clickhouse::client(&config.clickhouse).map_err(DeadLetterError::Client)?;
    ensure_table(&ch, &target).await.map_err(replay_error)?;
    let mut toast = ToastRequest::default();
    toast.add_package(&target, &package).map_err(replay_error)?;
    let current = if toast.is_empty() {
        Default::default()
    } else {
        fetch_current(&ch, &target, None, &toast)
            .await
            .map_err(replay_error)?
    };
    let mut builder = InsertBuilder::new(&target);
    builder
        .push_package(&package, &current)
        .map_err(replay_error)?;
    let rows = builder.rows();
    builder.send(&ch).await.map_err(replay_error)?;
    Ok((table, rows))
}

/// Deletes dead letter `sequence` from the stream.
pub async fn purge(config: &Config, sequence: u64) -> Result<(), DeadLetterError> {
    let stream = dead_letter_stream(config).await?;
    let delete_error = |source: Box<dyn std::error::Error + Send + Sync>| DeadLetterError::Delete {
        sequence,
        source,
    };
    tokio::time::timeout(READ_TIMEOUT, stream.delete_message(sequence))
        .await
        .map_err(|e| delete_error(Box::new(e)))?
        .map_err(|e| delete_error(Box::new(e)))?;
    Ok(())
}

/// `list` as text: one line per letter.
pub fn render_list(letters: &[Letter]) -> String {
    let mut out = String::new();
    for letter in letters {
        out.push_str(&format!(
            "{}  {}  {}  {}  stream_seq={}  {}\n",
            letter.sequence,
            letter.time,
            letter.reason,
            letter.table.as_deref().unwrap_or(&letter.subject),
            letter
                .stream_sequence
                .map_or("-".to_owned(), |s| s.to_string()),
            letter.error
        ));
    }
    if letters.is_empty() {
        out.push_str("no dead letters\n");
    }
    out
}
