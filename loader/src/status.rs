//! `sluice-loader status`: per table the loader knows (its `_sluice_positions`
//! rows), the state, the last applied chain position and commit LSN, and
//! the last package the replicator published on the table's subject; the
//! durable consumer's pending and ack-pending counts. Text for a terminal,
//! `--json` for scripts. Read-only: creates nothing in ClickHouse or NATS.
//!
//! A table's state comes from its durable row (ARCHITECTURE.md invariant 9):
//! `failed` (rows ClickHouse refused were refused again by the resync meant
//! to repair them: nothing is applied and no resync asked for until an
//! operator's resync), `blocked` (waiting for a resync after a gap, refused
//! rows or a schema change; nothing is applied to it), `resyncing` (a shadow table is being filled,
//! ARCHITECTURE.md invariant 4), otherwise `streaming`.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use serde::Serialize;
use sluice_broker::TableName;
use sluice_broker::config::Config;
use sluice_broker::topology;
use sluice_proto::v1;

use crate::chain::Position;
use crate::clickhouse::Error as ChError;
use crate::clickhouse::schema::quote_ident;
use crate::positions::{self, POSITIONS_TABLE, Stored};

/// Why the status could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("clickhouse client")]
    Client(#[source] crate::clickhouse::ClientError),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] ChError),
    #[error(transparent)]
    NatsConnect(#[from] sluice_broker::connect::ConnectError),
}

/// Everything `status` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub source: String,
    /// The ClickHouse database holding the tables and `_sluice_positions`.
    pub database: String,
    pub stream: StreamStatus,
    pub consumer: ConsumerStatus,
    pub tables: Vec<TableStatus>,
    /// What could not be read (the rest is still shown).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub exists: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsumerStatus {
    pub name: String,
    pub exists: bool,
    /// Messages not yet delivered to the loader.
    pub pending: Option<u64>,
    /// Messages delivered and not yet acknowledged.
    pub ack_pending: Option<u64>,
    pub ack_floor_stream_seq: Option<u64>,
}

/// A table's state, from its `_sluice_positions` row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TableState {
    Streaming,
    Resyncing,
    Blocked,
    Failed,
}

impl TableState {
    pub fn of(stored: &Stored) -> TableState {
        if stored.failed() {
            TableState::Failed
        } else if stored.blocked {
            TableState::Blocked
        } else if !stored.shadow.is_empty() {
            TableState::Resyncing
        } else {
            TableState::Streaming
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TableState::Streaming => "streaming",
            TableState::Resyncing => "resyncing",
            TableState::Blocked => "blocked",
            TableState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableStatus {
    /// `schema.table`.
    pub table: String,
    pub state: TableState,
    /// Last applied chain position, `generation/sequence`.
    pub applied_position: String,
    /// Commit LSN of the last applied package, `X/Y`; `None` when unknown
    /// (stored before the loader recorded it).
    pub applied_commit_lsn: Option<String>,
    /// The shadow table of a resync in progress.
    pub shadow: Option<String>,
    /// Why a blocked or failed table is so (`gap`, `refused`, …), and for
    /// rows ClickHouse refused, what it said.
    pub reason: Option<String>,
    /// Last package on the table's subject in the stream, `generation/sequence`.
    pub published_position: Option<String>,
    pub published_commit_lsn: Option<String>,
    /// The loader (`loader.consumer`) whose lease on the table the loaders'
    /// bucket holds (README "Several loaders"); `None`: no lease. A loader
    /// that died keeps its leases until another takes them over.
    pub loader: Option<String>,
}

/// `X/Y`, Postgres' form of an LSN.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// How long one read of a table's last package may take: a NATS user
/// without permission for it gets no answer at all, only a timeout.
const LAST_PACKAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// Gathers the status.
pub async fn gather(config: &Config) -> Result<Status, StatusError> {
    let ch = crate::clickhouse::client(&config.clickhouse).map_err(StatusError::Client)?;
    let database = config.clickhouse_database();
    let mut notes = Vec::new();
    let stored = if positions_exist(&ch, &database).await? {
        let (stored, _) = positions::load(&ch, &database).await?;
        stored
    } else {
        notes.push(format!(
            "no {database}.{POSITIONS_TABLE} table yet: the loader has not run against this database"
        ));
        Default::default()
    };
    let mut stored: Vec<(TableName, Stored)> = stored.into_iter().collect();
    stored.sort_by(|a, b| a.0.cmp(&b.0));

    let nats = sluice_broker::connect::connect(&config.nats, "sluice-loader status").await?;
    let js = jetstream::new(nats);
    let stream_name = config.stream_name();
    let mut stream_status = StreamStatus {
        name: stream_name.clone(),
        exists: false,
    };
    let mut consumer_status = ConsumerStatus {
        name: config.loader.consumer.clone(),
        exists: false,
        pending: None,
        ack_pending: None,
        ack_floor_stream_seq: None,
    };
    let mut published: Vec<Option<v1::Package>> = vec![None; stored.len()];
    match js.get_stream(&stream_name).await {
        Ok(stream) => {
            stream_status.exists = true;
            if let Ok(mut consumer) = stream
                .get_consumer::<pull::Config>(&config.loader.consumer)
                .await
            {
                consumer_status.exists = true;
                if let Ok(info) = consumer.info().await {
                    consumer_status.pending = Some(info.num_pending);
                    consumer_status.ack_pending = Some(info.num_ack_pending as u64);
                    consumer_status.ack_floor_stream_seq = Some(info.ack_floor.stream_sequence);
                }
            }
            for ((table, _), last) in stored.iter().zip(&mut published) {
                let subject = topology::table_subject(&config.source, &table.schema, &table.name);
                match last_package(&stream, &subject).await {
                    Ok(package) => *last = package,
                    Err(why) => {
                        // One failure (usually: this NATS user may not read
                        // messages by subject) says it for every table.
                        notes.push(format!(
                            "last published packages not shown: reading {subject}: {why}"
                        ));
                        break;
                    }
                }
            }
        }
        Err(error) => notes.push(format!("stream {stream_name}: {error}")),
    }
    let mut holders: Vec<Option<String>> = vec![None; stored.len()];
    let bucket = topology::loaders_bucket(config);
    match js.get_key_value(&bucket).await {
        Ok(kv) => {
            for ((table, _), holder) in stored.iter().zip(&mut holders) {
                let entry = tokio::time::timeout(
                    LAST_PACKAGE_TIMEOUT,
                    kv.entry(crate::share::lease_key(table)),
                )
                .await;
                match entry {
                    Ok(Ok(Some(entry))) if entry.operation == jetstream::kv::Operation::Put => {
                        *holder = Some(String::from_utf8_lossy(&entry.value).into_owned());
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        notes.push(format!(
                            "the loader of each table not shown: reading bucket {bucket}: {error}"
                        ));
                        break;
                    }
                    Err(_) => {
                        notes.push(format!(
                            "the loader of each table not shown: bucket {bucket} gave no answer within {LAST_PACKAGE_TIMEOUT:?}"
                        ));
                        break;
                    }
                }
            }
        }
        Err(error) => notes.push(format!("loaders' bucket {bucket}: {error}")),
    }

    let tables = stored
        .into_iter()
        .zip(published)
        .zip(holders)
        .map(|(((table, stored), last), loader)| TableStatus {
            table: table.to_string(),
            state: TableState::of(&stored),
            applied_position: stored.position.to_string(),
            applied_commit_lsn: (stored.commit_lsn != 0).then(|| format_lsn(stored.commit_lsn)),
            reason: stored.blocked.then(|| {
                let why = if stored.block_reason.is_empty() {
                    "gap"
                } else {
                    &stored.block_reason
                };
                if stored.refused.is_empty() {
                    why.to_owned()
                } else {
                    format!("{why}: {}", stored.refused)
                }
            }),
            shadow: (!stored.shadow.is_empty()).then_some(stored.shadow),
            published_position: last.as_ref().and_then(Position::of).map(|p| p.to_string()),
            published_commit_lsn: last.as_ref().map(|p| format_lsn(p.commit_lsn)),
            loader,
        })
        .collect();
    Ok(Status {
        source: config.source.clone(),
        database,
        stream: stream_status,
        consumer: consumer_status,
        tables,
        notes,
    })
}

/// Whether `_sluice_positions` exists (`status` creates nothing).
async fn positions_exist(ch: &clickhouse::Client, database: &str) -> Result<bool, ChError> {
    let exists: u8 = ch
        .query(&format!(
            "EXISTS TABLE {}.{}",
            quote_ident(database),
            quote_ident(POSITIONS_TABLE)
        ))
        .fetch_one()
        .await
        .map_err(|source| ChError::ClickHouse {
            what: "look for the positions table",
            source,
        })?;
    Ok(exists != 0)
}

/// The last package on `subject` (for a chunked one, what its position
/// header says), `None` when there is none or it does not decode.
async fn last_package(
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> Result<Option<v1::Package>, String> {
    let message = match tokio::time::timeout(
        LAST_PACKAGE_TIMEOUT,
        stream.get_last_raw_message_by_subject(subject),
    )
    .await
    {
        Err(_) => return Err(format!("no answer within {LAST_PACKAGE_TIMEOUT:?}")),
        Ok(Err(error))
            if matches!(
                error.kind(),
                jetstream::stream::LastRawMessageErrorKind::NoMessageFound
            ) =>
        {
            return Ok(None);
        }
        Ok(Err(error)) => return Err(sluice_broker::error_chain(&error)),
        Ok(Ok(message)) => message,
    };
    if let Some(position) = message.headers.get(sluice_broker::chunk::POSITION_HEADER) {
        return Ok(sluice_broker::chunk::package_from_position(
            position.as_str(),
        ));
    }
    let encoding = message
        .headers
        .get(sluice_proto::ENCODING_HEADER)
        .map(|v| v.as_str().to_owned());
    Ok(sluice_proto::decode(&message.payload, encoding.as_deref()).ok())
}

/// The status as lines of text.
pub fn render_text(status: &Status) -> String {
    let or_dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
    let number = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    let mut out = format!(
        "source   {}   database {}\nstream   {}{}\nconsumer {}{}  pending={} ack_pending={} ack_floor={}\n",
        status.source,
        status.database,
        status.stream.name,
        if status.stream.exists {
            ""
        } else {
            " (does not exist)"
        },
        status.consumer.name,
        if status.consumer.exists {
            ""
        } else {
            " (does not exist)"
        },
        number(status.consumer.pending),
        number(status.consumer.ack_pending),
        number(status.consumer.ack_floor_stream_seq),
    );
    out.push_str("tables\n");
    let width = status
        .tables
        .iter()
        .map(|t| t.table.len())
        .max()
        .unwrap_or(0);
    for table in &status.tables {
        out.push_str(&format!(
            "  {:width$}  {:<9}  loader={}  applied={} commit_lsn={}  published={} commit_lsn={}{}\n",
            table.table,
            table.state.as_str(),
            or_dash(table.loader.as_deref()),
            table.applied_position,
            or_dash(table.applied_commit_lsn.as_deref()),
            or_dash(table.published_position.as_deref()),
            or_dash(table.published_commit_lsn.as_deref()),
            table
                .shadow
                .as_deref()
                .map_or(String::new(), |s| format!("  shadow={s}")),
        ));
        if let Some(reason) = &table.reason {
            out.push_str(&format!("  {:width$}  reason: {reason}\n", ""));
        }
    }
    for note in &status.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(shadow: &str, blocked: bool) -> Stored {
        Stored {
            position: Position {
                generation: 2,
                sequence: 7,
            },
            shadow: shadow.into(),
            blocked,
            commit_lsn: 0x016B_3748,
            block_reason: String::new(),
            refused: String::new(),
            stream_sequence: 0,
        }
    }

    #[test]
    fn state_comes_from_the_durable_row() {
        assert_eq!(TableState::of(&stored("", false)), TableState::Streaming);
        assert_eq!(
            TableState::of(&stored("_sluice_resync__t", false)),
            TableState::Resyncing
        );
        // Blocked wins: nothing is applied, not even to the shadow.
        assert_eq!(
            TableState::of(&stored("_sluice_resync__t", true)),
            TableState::Blocked
        );
        let failed = Stored {
            block_reason: crate::positions::FAILED.into(),
            ..stored("_sluice_resync__t", true)
        };
        assert_eq!(TableState::of(&failed), TableState::Failed);
    }

    #[test]
    fn lsns_print_as_postgres_does() {
        assert_eq!(format_lsn(0x16B_3748), "0/16B3748");
        assert_eq!(format_lsn(0x1_0000_00FF), "1/FF");
    }

    #[test]
    fn text_and_json_name_each_table_with_its_state_and_position() {
        let status = Status {
            source: "app".into(),
            database: "sluice_app".into(),
            stream: StreamStatus {
                name: "SLUICE_APP".into(),
                exists: true,
            },
            consumer: ConsumerStatus {
                name: "sluice_loader".into(),
                exists: true,
                pending: Some(3),
                ack_pending: Some(0),
                ack_floor_stream_seq: Some(41),
            },
            tables: vec![TableStatus {
                table: "public.orders".into(),
                state: TableState::Resyncing,
                applied_position: "2/7".into(),
                applied_commit_lsn: Some("0/16B3748".into()),
                shadow: Some("_sluice_resync__orders".into()),
                reason: None,
                published_position: None,
                published_commit_lsn: None,
                loader: Some("loader_b".into()),
            }],
            notes: vec!["last published packages not shown".into()],
        };
        let text = render_text(&status);
        assert!(
            text.contains(
                "public.orders  resyncing  loader=loader_b  applied=2/7 commit_lsn=0/16B3748  published=- commit_lsn=-  shadow=_sluice_resync__orders"
            ),
            "{text}"
        );
        assert!(
            text.contains("pending=3 ack_pending=0 ack_floor=41"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&status).unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(json["tables"][0]["state"], "resyncing");
        assert_eq!(json["tables"][0]["applied_position"], "2/7");
        assert_eq!(json["consumer"]["pending"], 3);
        assert_eq!(json["tables"][0]["loader"], "loader_b");
    }
}
