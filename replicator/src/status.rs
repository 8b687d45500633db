//! `sluice-replicator status`: slot, stream, consumer and, per published
//! table, its state, last published position and lag, for a terminal or
//! (`--json`) for scripts. Read-only; secrets are never printed (both URLs
//! go through [`redact_url`]).
//!
//! A table's state is derived from durable state only, so it is the same
//! whether or not a replicator runs ([`table_state`]):
//! - `failed: <reason>`: the catalog says it cannot be replicated (no usable
//!   replica identity, ARCHITECTURE.md invariant 10; or the reserved schema
//!   `_control`);
//! - `snapshotting`: the initial snapshot (of a new or recreated slot) has not
//!   finished: no heartbeat in the stream yet, or the table's chain ends in a
//!   snapshot started at the slot's own consistent point;
//! - `resyncing`: the table's chain ends in a RESYNC_BEGIN or SNAPSHOT
//!   package of a resync (a resync that failed shows so until the table's
//!   next change, which continues its chain);
//! - `streaming`: anything else (the chain ends in changes, a truncate or a
//!   RESYNC_END, or the table has no package in the stream);
//! - `removed: …`: a table with packages in the stream that is no longer in
//!   the publication (its ClickHouse table is kept, nothing more arrives).
//!
//! The lag of a table is now minus the commit time of its last published
//! package: its replication lag while it changes, the time since its last
//! change when it is idle (the slot's `lag_bytes` is the WAL not yet
//! published and confirmed, for all tables). The loader's applied positions
//! are `sluice-loader status`'s to show (the replicator has no ClickHouse
//! client).

use serde_json::{Value, json};
use sluice_broker::TableName;
use sluice_broker::config::{Config, redact_url};
use sluice_broker::topology;
use sluice_proto::v1;

use crate::catalog;
use crate::packager::last_package;
use crate::pg::{self, PgError, PgSettings};
use crate::publish::now_us;
use crate::replication::Lsn;

/// Why the status could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    NatsConnect(#[from] sluice_broker::connect::ConnectError),
}

/// Gathers the status and prints it.
pub async fn print(config: &Config, as_json: bool) -> Result<(), StatusError> {
    let status = gather(config).await?;
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
    } else {
        print_text(&status);
    }
    Ok(())
}

/// A table's state from what is durable: whether the catalog lets it be
/// replicated (`Err(reason)` if not), the last package on its subject, the
/// last heartbeat of the source and the slot's confirmed flush LSN. See the
/// module docs.
pub fn table_state(
    replicable: Result<(), &str>,
    last: Option<&v1::Package>,
    heartbeat: Option<&v1::Package>,
    slot_confirmed: Option<Lsn>,
    resync_record: Option<&v1::SnapshotProgress>,
) -> String {
    if let Err(reason) = replicable {
        return format!("failed: {reason}");
    }
    let kind = last.map(|p| v1::Kind::try_from(p.kind).unwrap_or(v1::Kind::Unspecified));
    let generation = last.and_then(|p| p.position).map(|p| p.generation);
    match kind {
        // No complete initial snapshot in the stream yet.
        _ if heartbeat.is_none() => "snapshotting".to_owned(),
        Some(v1::Kind::ResyncBegin | v1::Kind::Snapshot) => {
            // The initial snapshot of a recreated slot runs in the slot's
            // generation, its consistent point, which the slot keeps as its
            // confirmed LSN until streaming starts; a resync's chain starts
            // at a generation of its own, which its progress record names
            // (and which may be the slot's confirmed LSN too).
            let resync = resync_record.is_some_and(|r| Some(r.generation) == generation);
            if !resync && generation.is_some() && generation == slot_confirmed.map(|lsn| lsn.0) {
                "snapshotting".to_owned()
            } else {
                "resyncing".to_owned()
            }
        }
        _ => "streaming".to_owned(),
    }
}

/// One published table's entry.
async fn table_status(
    config: &Config,
    client: &tokio_postgres::Client,
    stream: &async_nats::jetstream::stream::Stream,
    table: &TableName,
    heartbeat: Option<&v1::Package>,
    slot_confirmed: Option<Lsn>,
    record: Option<&v1::SnapshotProgress>,
) -> Value {
    let replicable = replicable(client, table).await;
    let subject = topology::table_subject(&config.source, &table.schema, &table.name);
    let (last, read_error) = match last_package(stream, &subject).await {
        Ok(last) => (last, None),
        Err(error) => (None, Some(sluice_broker::error_chain(&error))),
    };
    // A resync's progress record, on its table's own subject, for a table
    // that is being snapshotted.
    let snapshotting = last.as_ref().is_some_and(|p| {
        p.kind == v1::Kind::ResyncBegin as i32 || p.kind == v1::Kind::Snapshot as i32
    });
    let resync_record = if snapshotting {
        let subject = topology::resync_progress_subject(&config.source, &table.schema, &table.name);
        last_package(stream, &subject)
            .await
            .ok()
            .flatten()
            .and_then(|p| p.snapshot_progress)
    } else {
        None
    };
    let state = table_state(
        replicable.as_ref().map(|_| ()).map_err(String::as_str),
        last.as_ref(),
        heartbeat,
        slot_confirmed,
        resync_record.as_ref(),
    );
    let mut entry = entry(table, state, last.as_ref(), read_error);
    if let Some(snapshot) = entry["snapshot"].as_object_mut() {
        for record in [record, resync_record.as_ref()].into_iter().flatten() {
            add_chunks(snapshot, record, table, last.as_ref());
        }
    }
    entry
}

/// The chunks of a table's snapshot (initial or a resync's) and how many are
/// finished, from the snapshot's progress record, when the record is of the
/// table's chain (the same generation).
fn add_chunks(
    snapshot: &mut serde_json::Map<String, Value>,
    record: &v1::SnapshotProgress,
    table: &TableName,
    last: Option<&v1::Package>,
) {
    let generation = last.and_then(|p| p.position).map(|p| p.generation);
    if generation != Some(record.generation) {
        return;
    }
    if let Some(recorded) = crate::snapshot::recorded(record, table) {
        snapshot.insert("chunks".into(), json!(recorded.bounds.len() + 1));
        snapshot.insert("chunks_finished".into(), json!(recorded.finished.len()));
    }
}

/// The JSON of one table.
fn entry(
    table: &TableName,
    state: String,
    last: Option<&v1::Package>,
    read_error: Option<String>,
) -> Value {
    let position = last.and_then(|p| p.position);
    // Chunk positions carry no commit time.
    let commit_time_us = last.map(|p| p.commit_time_us).filter(|&t| t > 0);
    let snapshot = last
        .filter(|_| state == "snapshotting" || state == "resyncing")
        .and_then(|p| snapshot_progress(p, now_us()));
    json!({
        "table": table.to_string(),
        "state": state,
        "snapshot": snapshot,
        "generation": position.map(|p| p.generation),
        "sequence": position.map(|p| p.sequence),
        "last_published": position.map(|p| format!("{}/{}", p.generation, p.sequence)),
        "last_commit_lsn": last.map(|p| Lsn(p.commit_lsn).to_string()),
        "lag_seconds": commit_time_us.map(|t| lag_seconds(now_us(), t)),
        "stream_error": read_error,
    })
}

/// How far a running snapshot (initial or a resync's) got, from the last
/// package of its table: rows read so far, the estimate (`pg_class`
/// `reltuples`), the rate and the seconds left at that rate, and how long
/// ago that package was made (a replicator that stopped mid-snapshot shows
/// a growing age). `None` unless the package is a RESYNC_BEGIN or SNAPSHOT.
pub fn snapshot_progress(last: &v1::Package, now_us: i64) -> Option<Value> {
    let resync = last.resync.as_ref();
    let estimated = resync.map_or(0, |r| r.rows);
    let (rows, started_us) = match v1::Kind::try_from(last.kind).ok()? {
        v1::Kind::ResyncBegin => (0, last.commit_time_us),
        v1::Kind::Snapshot => (
            last.first_row_ordinal + sluice_proto::values::copy::row_count(last),
            resync.map_or(0, |r| r.started_us),
        ),
        _ => return None,
    };
    let (rate, eta) = if started_us > 0 && rows > 0 {
        let elapsed = (last.commit_time_us - started_us).max(0) as u64;
        let (rate, eta) =
            crate::snapshot::progress(rows, estimated, std::time::Duration::from_micros(elapsed));
        (Some(rate), eta)
    } else {
        (None, None)
    };
    Some(json!({
        "rows": rows,
        "estimated_rows": estimated,
        "rows_per_second": rate,
        "eta_seconds": eta,
        "updated_seconds_ago": lag_seconds(now_us, last.commit_time_us),
    }))
}

/// Now minus a commit time (microseconds since the UNIX epoch), in seconds,
/// never negative.
fn lag_seconds(now_us: i64, commit_time_us: i64) -> f64 {
    (now_us.saturating_sub(commit_time_us).max(0) as f64) / 1e6
}

async fn gather(config: &Config) -> Result<Value, StatusError> {
    let settings = PgSettings::from_config(&config.postgres)?;
    let sql = settings.connect("status").await?;
    let slot = pg::slot_state(&sql.client, &config.postgres.slot).await?;
    let wal = pg::current_wal_lsn(&sql.client).await?;
    let slot_json = match &slot {
        Some(s) => json!({
            "name": config.postgres.slot,
            "exists": true,
            "active": s.active_pid.is_some(),
            "active_pid": s.active_pid,
            "confirmed_flush_lsn": s.confirmed_flush.to_string(),
            "lag_bytes": wal.0.saturating_sub(s.confirmed_flush.0),
            "wal_status": s.wal_status,
        }),
        None => json!({"name": config.postgres.slot, "exists": false}),
    };
    let (published, publication_error) =
        match catalog::published_tables(&sql.client, &config.postgres.publication).await {
            Ok(tables) => (tables, None),
            Err(error) => (Vec::new(), Some(error.to_string())),
        };

    let nats = sluice_broker::connect::connect(&config.nats, "sluice-replicator status").await?;
    let js = async_nats::jetstream::new(nats);
    let stream_name = config.stream_name();
    let mut tables_json = Vec::new();
    let stream_json = match js.get_stream(&stream_name).await {
        Ok(mut stream) => {
            let info = stream.info().await.ok().cloned();
            let heartbeat = last_package(&stream, &topology::heartbeat_subject(&config.source))
                .await
                .ok()
                .flatten();
            let confirmed = slot.as_ref().map(|s| s.confirmed_flush);
            let record = last_package(
                &stream,
                &topology::snapshot_progress_subject(&config.source),
            )
            .await
            .ok()
            .flatten()
            .and_then(|package| package.snapshot_progress);
            for table in &published {
                tables_json.push(
                    table_status(
                        config,
                        &sql.client,
                        &stream,
                        table,
                        heartbeat.as_ref(),
                        confirmed,
                        record.as_ref(),
                    )
                    .await,
                );
            }
            if publication_error.is_none() {
                for table in removed_tables(config, &stream, &published).await {
                    let subject =
                        topology::table_subject(&config.source, &table.schema, &table.name);
                    let last = last_package(&stream, &subject).await.ok().flatten();
                    let state = format!(
                        "removed: not in publication {} (its ClickHouse table is kept)",
                        config.postgres.publication
                    );
                    tables_json.push(entry(&table, state, last.as_ref(), None));
                }
            }
            let consumer = match stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                    &config.loader.consumer,
                )
                .await
            {
                Ok(mut consumer) => match consumer.info().await {
                    Ok(info) => json!({
                        "name": config.loader.consumer,
                        "pending": info.num_pending,
                        "ack_pending": info.num_ack_pending,
                        "ack_floor_stream_seq": info.ack_floor.stream_sequence,
                    }),
                    Err(_) => json!({"name": config.loader.consumer, "exists": true}),
                },
                Err(_) => json!({"name": config.loader.consumer, "exists": false}),
            };
            match info {
                Some(info) => json!({
                    "name": stream_name,
                    "exists": true,
                    "messages": info.state.messages,
                    "bytes": info.state.bytes,
                    "first_sequence": info.state.first_sequence,
                    "last_sequence": info.state.last_sequence,
                    "replicas": info.config.num_replicas,
                    "cluster": info.cluster.as_ref().map(|c| json!({
                        "leader": c.leader,
                        "replicas": c.replicas.iter().map(|r| json!({"name": r.name, "current": r.current, "lag": r.lag})).collect::<Vec<_>>(),
                    })),
                    "consumer": consumer,
                }),
                None => json!({"name": stream_name, "exists": true}),
            }
        }
        Err(_) => {
            // No stream: nothing published yet; every table waits for its
            // snapshot unless the catalog says it cannot be replicated.
            for table in &published {
                tables_json.push(table_status_without_stream(&sql.client, table).await);
            }
            json!({"name": stream_name, "exists": false})
        }
    };
    Ok(json!({
        "source": config.source,
        "postgres": redact_url(&config.postgres.url),
        "nats": redact_url(&config.nats.url),
        "publication": config.postgres.publication,
        "publication_error": publication_error,
        "server_wal_lsn": wal.to_string(),
        "slot": slot_json,
        "stream": stream_json,
        "tables": tables_json,
    }))
}

/// Tables with packages in the stream that are not in the publication (any
/// more): removed from it.
async fn removed_tables(
    config: &Config,
    stream: &async_nats::jetstream::stream::Stream,
    published: &[TableName],
) -> Vec<TableName> {
    use futures::TryStreamExt as _;
    let Ok(subjects) = stream
        .info_with_subjects(topology::stream_subjects(&config.source))
        .await
    else {
        return Vec::new();
    };
    let subjects: Vec<(String, usize)> = subjects.try_collect().await.unwrap_or_default();
    let mut removed: Vec<TableName> = subjects
        .iter()
        .filter_map(|(subject, _)| topology::table_of_subject(&config.source, subject))
        .filter(|table| !published.contains(table))
        .collect();
    removed.sort();
    removed.dedup();
    removed
}

/// Whether the catalog lets `table` be replicated; the reason if not.
async fn replicable(client: &tokio_postgres::Client, table: &TableName) -> Result<(), String> {
    match catalog::replicable(client, table, &mut catalog::TypeCatalog::new()).await {
        Ok(replicable) => replicable,
        Err(error) => Err(format!("cannot read the catalog: {error}")),
    }
}

/// A table's entry when the stream does not exist.
async fn table_status_without_stream(client: &tokio_postgres::Client, table: &TableName) -> Value {
    let replicable = replicable(client, table).await;
    let state = table_state(
        replicable.as_ref().map(|_| ()).map_err(String::as_str),
        None,
        None,
        None,
        None,
    );
    entry(table, state, None, None)
}

fn print_text(status: &Value) {
    let s = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!(
        "source   {}   postgres {}   nats {}",
        s(&status["source"]),
        s(&status["postgres"]),
        s(&status["nats"])
    );
    let slot = &status["slot"];
    println!(
        "slot     {}  exists={} active={} confirmed={} lag_bytes={} wal_status={}",
        s(&slot["name"]),
        s(&slot["exists"]),
        s(&slot["active"]),
        s(&slot["confirmed_flush_lsn"]),
        s(&slot["lag_bytes"]),
        s(&slot["wal_status"])
    );
    let stream = &status["stream"];
    println!(
        "stream   {}  messages={} bytes={} seq={}..{} replicas={}",
        s(&stream["name"]),
        s(&stream["messages"]),
        s(&stream["bytes"]),
        s(&stream["first_sequence"]),
        s(&stream["last_sequence"]),
        s(&stream["replicas"])
    );
    if let Some(replicas) = stream["cluster"]["replicas"].as_array() {
        println!("         leader={}", s(&stream["cluster"]["leader"]));
        for replica in replicas {
            println!(
                "         replica {} current={} lag={}",
                s(&replica["name"]),
                s(&replica["current"]),
                s(&replica["lag"])
            );
        }
    }
    let consumer = &stream["consumer"];
    println!(
        "consumer {}  pending={} ack_pending={} ack_floor={}",
        s(&consumer["name"]),
        s(&consumer["pending"]),
        s(&consumer["ack_pending"]),
        s(&consumer["ack_floor_stream_seq"])
    );
    println!("tables of publication {}", s(&status["publication"]));
    if let Some(error) = status["publication_error"].as_str() {
        println!("  {error}");
    }
    if let Some(tables) = status["tables"].as_array() {
        for table in tables {
            let lag = table["lag_seconds"]
                .as_f64()
                .map_or_else(|| "-".to_owned(), |lag| format!("{lag:.1}s"));
            println!(
                "  {:<40} {:<12} last_published={} commit_lsn={} lag={}",
                s(&table["table"]),
                s(&table["state"]),
                s(&table["last_published"]),
                s(&table["last_commit_lsn"]),
                lag
            );
            let snapshot = &table["snapshot"];
            if snapshot.is_object() {
                let eta = snapshot["eta_seconds"]
                    .as_u64()
                    .map_or_else(|| "-".to_owned(), |eta| format!("{eta}s"));
                let chunks = match (
                    snapshot["chunks_finished"].as_u64(),
                    snapshot["chunks"].as_u64(),
                ) {
                    (Some(done), Some(all)) => format!(" chunks={done}/{all} (finished)"),
                    _ => String::new(),
                };
                println!(
                    "    snapshot rows={}/{} (estimated) rows_per_second={} eta={} updated={:.1}s ago{chunks}",
                    s(&snapshot["rows"]),
                    s(&snapshot["estimated_rows"]),
                    s(&snapshot["rows_per_second"]),
                    eta,
                    snapshot["updated_seconds_ago"].as_f64().unwrap_or(0.0)
                );
            }
            if let Some(error) = table["stream_error"].as_str() {
                println!("    cannot read its last package: {error}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_progress_counts_rows_from_the_last_package() {
        let begin = v1::Package {
            kind: v1::Kind::ResyncBegin as i32,
            commit_time_us: 1_000_000,
            resync: Some(v1::Resync {
                rows: 4000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let at_begin = snapshot_progress(&begin, 3_000_000).unwrap();
        assert_eq!(at_begin["rows"], 0);
        assert_eq!(at_begin["estimated_rows"], 4000);
        assert_eq!(at_begin["eta_seconds"], Value::Null);
        assert_eq!(at_begin["updated_seconds_ago"], 2.0);
        // Rows 900..999 read ten seconds after the start: 100 rows/s, 30 s left.
        let snapshot = v1::Package {
            kind: v1::Kind::Snapshot as i32,
            commit_time_us: 11_000_000,
            first_row_ordinal: 900,
            rows: vec![v1::Row::default(); 100],
            resync: Some(v1::Resync {
                rows: 4000,
                started_us: 1_000_000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let midway = snapshot_progress(&snapshot, 11_000_000).unwrap();
        assert_eq!(midway["rows"], 1000);
        assert_eq!(midway["rows_per_second"], 100);
        assert_eq!(midway["eta_seconds"], 30);
        let changes = v1::Package {
            kind: v1::Kind::Changes as i32,
            ..Default::default()
        };
        assert!(snapshot_progress(&changes, 0).is_none());
    }

    fn package(kind: v1::Kind, generation: u64, sequence: u64) -> v1::Package {
        v1::Package {
            kind: kind as i32,
            position: Some(v1::ChainPosition {
                generation,
                sequence,
            }),
            commit_lsn: generation,
            ..Default::default()
        }
    }

    #[test]
    fn chunks_come_from_the_progress_record_of_the_same_chain() {
        let table = TableName::new("public", "big");
        let record = v1::SnapshotProgress {
            generation: 100,
            tables: vec![v1::TableProgress {
                schema: "public".into(),
                table: "big".into(),
                bounds: vec![16, 32, 48],
                finished: vec![0, 2],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut snapshot = serde_json::Map::new();
        let last = package(v1::Kind::Snapshot, 100, 9);
        add_chunks(&mut snapshot, &record, &table, Some(&last));
        assert_eq!(snapshot["chunks"], 4);
        assert_eq!(snapshot["chunks_finished"], 2);
        // A record of another generation (an older slot's) says nothing.
        let mut snapshot = serde_json::Map::new();
        let last = package(v1::Kind::Snapshot, 200, 9);
        add_chunks(&mut snapshot, &record, &table, Some(&last));
        assert!(snapshot.is_empty());
    }

    #[test]
    fn state_comes_from_the_chain_the_heartbeat_and_the_slot() {
        let hb = package(v1::Kind::Heartbeat, 100, 0);
        let hb = Some(&hb);
        let slot = Some(Lsn(500));
        assert_eq!(
            table_state(Err("no replica identity"), None, hb, slot, None),
            "failed: no replica identity"
        );
        // Before the first heartbeat the initial snapshot is not complete.
        let begin = package(v1::Kind::ResyncBegin, 100, 1);
        assert_eq!(
            table_state(Ok(()), Some(&begin), None, Some(Lsn(100)), None),
            "snapshotting"
        );
        assert_eq!(table_state(Ok(()), None, None, None, None), "snapshotting");
        // Streaming: changes, a truncate, the end of a snapshot, or nothing yet.
        for kind in [v1::Kind::Changes, v1::Kind::Truncate, v1::Kind::ResyncEnd] {
            assert_eq!(
                table_state(Ok(()), Some(&package(kind, 100, 7)), hb, slot, None),
                "streaming"
            );
        }
        assert_eq!(table_state(Ok(()), None, hb, slot, None), "streaming");
        // A resync's chain has a generation of its own.
        for kind in [v1::Kind::ResyncBegin, v1::Kind::Snapshot] {
            assert_eq!(
                table_state(Ok(()), Some(&package(kind, 900, 2)), hb, slot, None),
                "resyncing"
            );
        }
        // A recreated slot snapshots in its own generation while an old
        // heartbeat is still the last one.
        let recreated = package(v1::Kind::Snapshot, 500, 3);
        assert_eq!(
            table_state(Ok(()), Some(&recreated), hb, slot, None),
            "snapshotting"
        );
        // A resync whose chain's generation is the slot's confirmed LSN
        // (the slot was idle when the resync's temporary slot was made)
        // says so in its progress record.
        let record = v1::SnapshotProgress {
            generation: 500,
            ..Default::default()
        };
        assert_eq!(
            table_state(Ok(()), Some(&recreated), hb, slot, Some(&record)),
            "resyncing"
        );
        let older = v1::SnapshotProgress {
            generation: 400,
            ..Default::default()
        };
        assert_eq!(
            table_state(Ok(()), Some(&recreated), hb, slot, Some(&older)),
            "snapshotting"
        );
    }

    #[test]
    fn lag_is_never_negative() {
        assert_eq!(lag_seconds(3_500_000, 1_000_000), 2.5);
        assert_eq!(lag_seconds(1_000_000, 3_000_000), 0.0);
    }
}
