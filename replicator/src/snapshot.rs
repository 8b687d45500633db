//! Snapshots: every row of a table as of a slot's exported snapshot, as
//! `SNAPSHOT` packages framed by `RESYNC_BEGIN` and `RESYNC_END`.
//!
//! Readers import the snapshot (`REPEATABLE READ` + `SET TRANSACTION
//! SNAPSHOT`) while the connection that created the slot stays idle, which
//! keeps the snapshot alive; tables are read in parallel
//! (`replicator.snapshot_parallelism`) with `COPY … TO STDOUT`, the fastest way
//! out of Postgres. Rows flow through a bounded channel to the one task that
//! owns the chains and the publisher, so memory stays bounded and chains stay
//! ordered. Snapshot rows carry the consistent point as their commit LSN; see
//! `sluice_proto::row_version` for why streamed changes always win over them.

use std::sync::Arc;

use bytes::BytesMut;
use futures::StreamExt;
use metrics::{counter, gauge};
use sluice_broker::TableName;
use sluice_broker::config::Config;
use sluice_broker::publish::PublishError;
use sluice_broker::table::quote_ident;
use sluice_proto::v1;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, CatalogError, TypeCatalog, TypeInfo};
use crate::metrics as m;
use crate::packager::{Packager, value_size};
use crate::pg::{PgError, PgSettings};
use crate::publish::{Publisher, now_us};
use crate::replication::{Lsn, ReplicationError, quote_literal};
use crate::values;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("snapshot of {table}: malformed COPY row {row}")]
    Copy { table: String, row: u64 },
    #[error("snapshot of {table}: value of column {column} does not parse")]
    Value {
        table: String,
        column: String,
        #[source]
        source: values::ValueError,
    },
    #[error("snapshot reader of {0} stopped unexpectedly")]
    ReaderLost(String),
    /// A resync could not open its replication connection or create its
    /// temporary slot.
    #[error("resync of {table}: cannot create its temporary slot")]
    ResyncSlot {
        table: String,
        #[source]
        source: ReplicationError,
    },
}

/// What a snapshot reader reports, in order: Begin, Package…, End.
pub(crate) enum Event {
    Begin {
        table: TableName,
        relation: Arc<v1::Relation>,
        estimate: u64,
        /// The snapshot's consistent point.
        lsn: Lsn,
    },
    Package(Box<v1::Package>),
    End {
        table: TableName,
        relation: Arc<v1::Relation>,
        rows: u64,
    },
}

/// What one snapshot is about.
#[derive(Debug, Clone)]
pub struct SnapshotSpec {
    /// Set for resyncs on request; initial snapshots derive it from the generation.
    pub resync_id: String,
    pub snapshot_name: String,
    pub consistent_point: Lsn,
    pub reason: String,
}

/// The initial snapshot of every table (also used after a slot was lost).
#[allow(clippy::too_many_arguments)]
pub async fn initial(
    config: &Config,
    settings: &PgSettings,
    snapshot_name: &str,
    consistent_point: Lsn,
    tables: &[TableName],
    reason: &str,
    packager: &mut Packager,
    publisher: &mut Publisher,
    shutdown: &CancellationToken,
) -> Result<(), SnapshotError> {
    let spec = SnapshotSpec {
        resync_id: String::new(),
        snapshot_name: snapshot_name.to_owned(),
        consistent_point,
        reason: reason.to_owned(),
    };
    let (tx, mut rx) = mpsc::channel::<Result<Event, SnapshotError>>(8);
    let parallelism = config.replicator.snapshot_parallelism;
    let limits = (
        config.replicator.package_max_rows,
        config.replicator.package_max_bytes,
    );
    let source = config.source.clone();
    let queue = Arc::new(tokio::sync::Mutex::new(tables.to_vec()));
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..parallelism.min(tables.len()).max(1) {
        let (tx, queue, settings, spec, source, publication) = (
            tx.clone(),
            queue.clone(),
            settings.clone(),
            spec.clone(),
            source.clone(),
            config.postgres.publication.clone(),
        );
        readers.spawn(async move {
            loop {
                let Some(table) = queue.lock().await.pop() else {
                    return;
                };
                if let Err(error) =
                    read_table(&settings, &spec, &source, &publication, &table, limits, &tx).await
                {
                    let _ = tx.send(Err(error)).await;
                    return;
                }
            }
        });
    }
    drop(tx);
    let generation = packager.generation();
    while let Some(event) = tokio::select! {
        event = rx.recv() => event,
        _ = shutdown.cancelled() => None,
    } {
        match event? {
            Event::Begin {
                table,
                relation,
                estimate,
                ..
            } => {
                let label = table.to_string();
                tracing::info!(table = %label, estimated_rows = estimate, reason = %spec.reason, "snapshot started");
                gauge!(m::RESYNC_IN_PROGRESS, "table" => label.clone()).set(1.0);
                counter!(m::RESYNCS, "table" => label, "reason" => spec.reason.clone())
                    .increment(1);
                let package = marker(
                    &source,
                    &table,
                    &relation,
                    v1::Kind::ResyncBegin,
                    &spec,
                    generation,
                    estimate,
                );
                publisher.publish(packager.chain_package(package)).await?;
            }
            Event::Package(package) => {
                publisher.publish(packager.chain_package(*package)).await?;
            }
            Event::End {
                table,
                relation,
                rows,
            } => {
                let label = table.to_string();
                let package = marker(
                    &source,
                    &table,
                    &relation,
                    v1::Kind::ResyncEnd,
                    &spec,
                    generation,
                    rows,
                );
                publisher.publish(packager.chain_package(package)).await?;
                gauge!(m::RESYNC_IN_PROGRESS, "table" => label.clone()).set(0.0);
                tracing::info!(table = %label, rows, "snapshot published");
            }
        }
    }
    readers.abort_all();
    while readers.join_next().await.is_some() {}
    if !shutdown.is_cancelled() {
        publisher.flush().await?;
    }
    Ok(())
}

pub(crate) fn marker(
    source: &str,
    table: &TableName,
    relation: &Arc<v1::Relation>,
    kind: v1::Kind,
    spec: &SnapshotSpec,
    generation: u64,
    rows: u64,
) -> v1::Package {
    v1::Package {
        source: source.to_owned(),
        schema: table.schema.clone(),
        table: table.name.clone(),
        kind: kind as i32,
        relation: Some((**relation).clone()),
        commit_lsn: spec.consistent_point.0,
        commit_time_us: now_us(),
        resync: Some(v1::Resync {
            resync_id: if spec.resync_id.is_empty() {
                format!("{generation:X}-{table}")
            } else {
                spec.resync_id.clone()
            },
            reason: spec.reason.clone(),
            rows,
            // Stamped by `Packager::chain_package`.
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) async fn read_table(
    settings: &PgSettings,
    spec: &SnapshotSpec,
    source: &str,
    publication: &str,
    table: &TableName,
    (max_rows, max_bytes): (usize, usize),
    tx: &mpsc::Sender<Result<Event, SnapshotError>>,
) -> Result<(), SnapshotError> {
    let label = table.to_string();
    let conn = settings.connect("a snapshot").await?;
    let client = &conn.client;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; \
             SET LOCAL datestyle = ISO; SET LOCAL intervalstyle = postgres; SET LOCAL extra_float_digits = 3; \
             SET LOCAL bytea_output = hex; SET LOCAL lc_monetary = 'C'; SET LOCAL timezone = 'UTC'",
            quote_literal(&spec.snapshot_name)
        ))
        .await
        .map_err(PgError::sql(format!("cannot import snapshot for {label}")))?;
    // Only what the publication publishes: its column list and row filter
    // (the stream carries the same, pgoutput applies them).
    let view = catalog::published_view(client, publication, table).await?;
    let mut info = catalog::table_columns(client, table).await?;
    catalog::restrict(&view, &mut info);
    let mut types = TypeCatalog::new();
    types.resolve_table(client, &info).await?;
    let relation = Arc::new(catalog::to_relation(&info, &types)?);
    let column_types: Vec<TypeInfo> = info
        .columns
        .iter()
        .map(|c| {
            types
                .get(c.type_oid)
                .cloned()
                .ok_or(CatalogError::TypeNotResolved { oid: c.type_oid })
        })
        .collect::<Result<_, _>>()?;
    // A partitioned table holds no rows itself: its leaves' estimates add up
    // (autovacuum keeps those fresh; the root's own is only set by a manual
    // ANALYZE of it).
    let estimate: f32 = client
        .query_one(
            "SELECT CASE WHEN c.relkind = 'p' THEN coalesce( \
                 (SELECT sum(greatest(l.reltuples, 0)) FROM pg_catalog.pg_partition_tree(c.oid) t \
                  JOIN pg_catalog.pg_class l ON l.oid = t.relid WHERE t.isleaf), 0) \
                 ELSE greatest(c.reltuples, 0) END::real \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(PgError::sql(format!("cannot estimate the size of {label}")))?
        .get(0);
    let send = |event| async {
        tx.send(Ok(event))
            .await
            .map_err(|_| SnapshotError::ReaderLost(label.clone()))
    };
    send(Event::Begin {
        table: table.clone(),
        relation: relation.clone(),
        estimate: estimate as u64,
        lsn: spec.consistent_point,
    })
    .await?;

    let columns: Vec<String> = info.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let copy = format!(
        "COPY (SELECT {} FROM {}{}) TO STDOUT",
        columns.join(", "),
        table.quoted(),
        view.where_clause()
    );
    let stream = client
        .copy_out(copy.as_str())
        .await
        .map_err(PgError::sql(format!("cannot read {label}")))?;
    futures::pin_mut!(stream);
    let mut buffer = BytesMut::new();
    let mut rows: Vec<v1::Row> = Vec::new();
    let mut bytes = 0usize;
    let mut total: u64 = 0;
    let mut package_index = 0u32;
    let mut first_ordinal = 0u64;
    let started = std::time::Instant::now();
    let started_us = now_us();
    let mut last_log = started;
    let counter = counter!(m::SNAPSHOT_ROWS, "table" => label.clone());
    metrics::gauge!(m::SNAPSHOT_ROWS_ESTIMATED, "table" => label.clone()).set(f64::from(estimate));
    let published = counter!(m::PUBLISHED_ROWS, "table" => label.clone(), "op" => "snapshot");
    let mut flush =
        |rows: &mut Vec<v1::Row>, bytes: &mut usize, first_ordinal: &mut u64, total: u64| {
            let package = v1::Package {
                source: source.to_owned(),
                schema: table.schema.clone(),
                table: table.name.clone(),
                kind: v1::Kind::Snapshot as i32,
                relation: Some((*relation).clone()),
                commit_lsn: spec.consistent_point.0,
                commit_time_us: now_us(),
                package_index,
                first_row_ordinal: *first_ordinal,
                rows: std::mem::take(rows),
                // For `status`: how far the snapshot got, from the stream alone.
                resync: Some(v1::Resync {
                    rows: estimate as u64,
                    started_us,
                    ..Default::default()
                }),
                ..Default::default()
            };
            package_index += 1;
            *first_ordinal = total;
            *bytes = 0;
            package
        };
    loop {
        let chunk = stream.next().await;
        let done = chunk.is_none();
        if let Some(chunk) = chunk {
            buffer.extend_from_slice(
                &chunk.map_err(PgError::sql(format!("reading {label} failed")))?,
            );
        }
        while let Some(newline) = buffer.iter().position(|&b| b == b'\n') {
            let line = buffer.split_to(newline + 1);
            let line = &line[..newline];
            let fields = parse_copy_line(line).ok_or_else(|| SnapshotError::Copy {
                table: label.clone(),
                row: total + 1,
            })?;
            if fields.len() != column_types.len() {
                return Err(SnapshotError::Copy {
                    table: label.clone(),
                    row: total + 1,
                });
            }
            let mut values_out = Vec::with_capacity(fields.len());
            for (i, field) in fields.into_iter().enumerate() {
                let value = match field {
                    None => values::null(),
                    Some(text) => {
                        values::decode_text(&column_types[i], &text).map_err(|source| {
                            SnapshotError::Value {
                                table: label.clone(),
                                column: info.columns[i].name.clone(),
                                source,
                            }
                        })?
                    }
                };
                bytes += value_size(&value);
                values_out.push(value);
            }
            rows.push(v1::Row {
                op: v1::Op::Insert as i32,
                values: values_out,
                old_key: Vec::new(),
            });
            total += 1;
            if rows.len() >= max_rows || bytes >= max_bytes {
                counter.increment(rows.len() as u64);
                published.increment(rows.len() as u64);
                let package = flush(&mut rows, &mut bytes, &mut first_ordinal, total);
                send(Event::Package(Box::new(package))).await?;
                // `return(MS)`: a slow snapshot, so that a test's changes
                // overtake it.
                #[cfg(feature = "failpoints")]
                if let Some(Some(ms)) = fail::eval("replicator::snapshot::package", |arg| {
                    arg.and_then(|ms| ms.parse::<u64>().ok())
                }) {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                if last_log.elapsed() > PROGRESS_EVERY {
                    let (rate, eta) = progress(total, estimate as u64, started.elapsed());
                    tracing::info!(table = %label, rows = total, estimated_rows = estimate as u64, rows_per_second = rate, eta_seconds = eta, "snapshot progress");
                    last_log = std::time::Instant::now();
                }
            }
        }
        if done {
            break;
        }
    }
    if !rows.is_empty() {
        counter.increment(rows.len() as u64);
        published.increment(rows.len() as u64);
        let package = flush(&mut rows, &mut bytes, &mut first_ordinal, total);
        send(Event::Package(Box::new(package))).await?;
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(PgError::sql(format!("cannot end the snapshot of {label}")))?;
    send(Event::End {
        table: table.clone(),
        relation,
        rows: total,
    })
    .await?;
    Ok(())
}

/// Parses one line of `COPY … TO STDOUT` text format: tab-separated fields,
/// `\N` for NULL, backslash escapes. `None` for a malformed line.
pub fn parse_copy_line(line: &[u8]) -> Option<Vec<Option<String>>> {
    let mut fields = Vec::new();
    for raw in line.split(|&b| b == b'\t') {
        if raw == b"\\N" {
            fields.push(None);
            continue;
        }
        let mut out = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            let b = raw[i];
            if b != b'\\' {
                out.push(b);
                i += 1;
                continue;
            }
            let next = *raw.get(i + 1)?;
            i += 2;
            match next {
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'v' => out.push(11),
                b'0'..=b'7' => {
                    let mut value = u32::from(next - b'0');
                    let mut digits = 1;
                    while digits < 3 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
                        value = value * 8 + u32::from(raw[i] - b'0');
                        i += 1;
                        digits += 1;
                    }
                    out.push((value & 0xff) as u8);
                }
                b'x' => {
                    let mut value = 0u32;
                    let mut digits = 0;
                    while digits < 2 && i < raw.len() && raw[i].is_ascii_hexdigit() {
                        value = value * 16 + char::from(raw[i]).to_digit(16)?;
                        i += 1;
                        digits += 1;
                    }
                    if digits == 0 {
                        return None;
                    }
                    out.push(value as u8);
                }
                other => out.push(other),
            }
        }
        fields.push(Some(String::from_utf8(out).ok()?));
    }
    Some(fields)
}

/// How often a running snapshot logs its progress.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Rows per second so far, and the seconds left at that rate until
/// `estimated` rows (`None` once the estimate is passed: it was low).
pub(crate) fn progress(
    rows: u64,
    estimated: u64,
    elapsed: std::time::Duration,
) -> (u64, Option<u64>) {
    let seconds = elapsed.as_secs_f64().max(0.001);
    let rate = rows as f64 / seconds;
    let eta =
        (estimated > rows && rate > 0.0).then(|| ((estimated - rows) as f64 / rate).ceil() as u64);
    (rate as u64, eta)
}

#[cfg(test)]
mod tests {
    use super::{parse_copy_line, progress};

    #[test]
    fn progress_estimates_the_time_left_at_the_rate_so_far() {
        let ten = std::time::Duration::from_secs(10);
        assert_eq!(progress(1000, 4000, ten), (100, Some(30)));
        assert_eq!(
            progress(5000, 4000, ten),
            (500, None),
            "the estimate was low"
        );
        assert_eq!(progress(0, 4000, ten), (0, None));
    }

    #[test]
    fn copy_text_format_is_unescaped() {
        let fields = parse_copy_line(b"1\t\\N\ta\\tb\\nc\\\\d\t\\x41\\101\t").expect("valid");
        assert_eq!(
            fields,
            vec![
                Some("1".into()),
                None,
                Some("a\tb\nc\\d".into()),
                Some("AA".into()),
                Some(String::new())
            ]
        );
        assert_eq!(parse_copy_line(b"\\"), None, "dangling backslash");
        assert_eq!(
            parse_copy_line(b"{\"a b\",NULL}"),
            Some(vec![Some("{\"a b\",NULL}".into())])
        );
    }
}
