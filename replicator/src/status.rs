//! `sluice-replicator status`: slot, stream, consumer and per-table chains,
//! for a terminal or (`--json`) for scripts. Secrets are never printed.

use serde_json::{Value, json};
use sluice_broker::config::{Config, redact_url};
use sluice_broker::topology;

use crate::catalog::{self, TypeCatalog};
use crate::packager::last_package;
use crate::pg::{self, PgError, PgSettings};

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

    let nats = sluice_broker::connect::connect(&config.nats, "sluice-replicator status").await?;
    let js = async_nats::jetstream::new(nats);
    let stream_name = config.stream_name();
    let mut tables_json = Vec::new();
    let stream_json = match js.get_stream(&stream_name).await {
        Ok(mut stream) => {
            let info = stream.info().await.ok().cloned();
            let mut types = TypeCatalog::new();
            let tables = catalog::published_tables(&sql.client, &config.postgres.publication)
                .await
                .unwrap_or_default();
            let _ = &mut types;
            for table in tables {
                let subject = topology::table_subject(&config.source, &table.schema, &table.name);
                let last = last_package(&stream, &subject).await.ok().flatten();
                tables_json.push(json!({
                    "table": table.to_string(),
                    "last_published": last.as_ref().and_then(|p| p.position).map(|p| format!("{}/{}", p.generation, p.sequence)),
                    "last_commit_lsn": last.as_ref().map(|p| crate::replication::Lsn(p.commit_lsn).to_string()),
                }));
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
        Err(_) => json!({"name": stream_name, "exists": false}),
    };
    Ok(json!({
        "source": config.source,
        "postgres": redact_url(&config.postgres.url),
        "nats": config.nats.url,
        "server_wal_lsn": wal.to_string(),
        "slot": slot_json,
        "stream": stream_json,
        "tables": tables_json,
    }))
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
    println!("tables");
    if let Some(tables) = status["tables"].as_array() {
        for table in tables {
            println!(
                "  {:<40} last_published={} commit_lsn={}",
                s(&table["table"]),
                s(&table["last_published"]),
                s(&table["last_commit_lsn"])
            );
        }
    }
}
