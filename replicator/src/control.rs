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
}

/// Sends a resync request and prints what the replicator accepted.
pub async fn request_resync(
    config: &Config,
    tables: &[String],
    all: bool,
    wait: bool,
) -> Result<(), ControlError> {
    let client = sluice_broker::connect::connect(&config.nats, "sluice-replicator resync").await?;
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
    if wait {
        println!(
            "the replicator publishes the snapshot now; follow sluice_resync_in_progress or `sluice-replicator status`"
        );
    }
    Ok(())
}
