//! Control requests to a running replicator over NATS request/reply on
//! `sluice.<source>._control.resync.request` (outside the stream).

use std::time::Duration;

use sluice_broker::config::Config;
use sluice_broker::topology;
use sluice_proto::{Message, v1};

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Connect(#[from] sluice_broker::connect::ConnectError),
    #[error(
        "no replicator of source {source_name} answered on {subject}; is `sluice-replicator run` up?"
    )]
    NoReplicator {
        source_name: String,
        subject: String,
    },
    #[error("request on {subject} failed")]
    Request {
        subject: String,
        #[source]
        source: async_nats::RequestError,
    },
    #[error("the replicator's reply does not decode")]
    Reply(#[source] sluice_proto::prost::DecodeError),
    #[error("the replicator refused the resync: {0}")]
    Refused(String),
    #[error("cannot follow resync progress")]
    Subscribe(#[source] async_nats::SubscribeError),
    #[error("resync of {table} failed: {error}")]
    Failed { table: String, error: String },
    #[error(
        "the replicator stopped reporting progress for {0:?} (it may have restarted); request the resync again"
    )]
    Silent(Vec<String>),
}

/// Sends a resync request and prints what the replicator accepted.
pub async fn request_resync(
    config: &Config,
    tables: &[String],
    all: bool,
    wait: bool,
) -> Result<(), ControlError> {
    let client = sluice_broker::connect::connect(&config.nats, "sluice-replicator resync").await?;
    // Subscribe before asking, so no progress event is missed.
    let mut events = client
        .subscribe(topology::resync_events_subject(&config.source))
        .await
        .map_err(ControlError::Subscribe)?;
    let subject = topology::resync_request_subject(&config.source);
    let request = v1::ResyncRequest {
        tables: tables.to_vec(),
        all,
        reason: "manual".into(),
    };
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(subject.clone(), request.encode_to_vec().into()),
    )
    .await
    .map_err(|_| ControlError::NoReplicator {
        source_name: config.source.clone(),
        subject: subject.clone(),
    })?;
    let reply = match reply {
        Ok(reply) => reply,
        Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => {
            return Err(ControlError::NoReplicator {
                source_name: config.source.clone(),
                subject,
            });
        }
        Err(source) => return Err(ControlError::Request { subject, source }),
    };
    let reply = v1::ResyncReply::decode(reply.payload).map_err(ControlError::Reply)?;
    if !reply.error.is_empty() {
        return Err(ControlError::Refused(reply.error));
    }
    for started in &reply.started {
        println!(
            "resync of {} accepted (id {})",
            started.table, started.resync_id
        );
    }
    if !wait {
        return Ok(());
    }
    let mut waiting: std::collections::HashMap<String, String> = reply
        .started
        .iter()
        .map(|s| (s.resync_id.clone(), s.table.clone()))
        .collect();
    let mut last_print = std::time::Instant::now();
    while !waiting.is_empty() {
        // The replicator reports at least once per package; a long silence
        // means it is gone.
        let next = tokio::time::timeout(
            Duration::from_secs(120),
            futures::StreamExt::next(&mut events),
        )
        .await;
        let Ok(Some(message)) = next else {
            return Err(ControlError::Silent(waiting.into_values().collect()));
        };
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(&message.payload) else {
            continue;
        };
        let Some(id) = event["resync_id"].as_str() else {
            continue;
        };
        let Some(table) = waiting.get(id).cloned() else {
            continue;
        };
        let rows = event["rows"].as_u64().unwrap_or(0);
        if let Some(error) = event["error"].as_str() {
            return Err(ControlError::Failed {
                table,
                error: error.to_owned(),
            });
        }
        if event["done"].as_bool() == Some(true) {
            println!(
                "{table}: snapshot published ({rows} rows); the loader swaps it in when it reaches the end marker"
            );
            waiting.remove(id);
        } else if last_print.elapsed() > Duration::from_secs(2) {
            println!("{table}: {rows} rows published");
            last_print = std::time::Instant::now();
        }
    }
    Ok(())
}
