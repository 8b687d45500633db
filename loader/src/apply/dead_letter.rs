//! Dead letters: a message the loader will never apply is copied to the
//! source's dead-letter subject with its reason, then terminated (so
//! JetStream stops redelivering it) and counted in
//! `sluice_dead_letters_total{reason}`; the other tables go on
//! (ARCHITECTURE.md invariants 6 and 10).
//!
//! The copy keeps the original payload and its encoding/format headers, so
//! it can be decoded and replayed by hand.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use metrics::counter;
use sluice_broker::topology;

use super::{ApplyError, Loader};
use crate::metrics as m;

/// A message of the batch to move to the dead-letter subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DeadLetter {
    /// Index of the message in the batch.
    pub(super) message: usize,
    /// One of [`crate::metrics::DEAD_LETTER_REASONS`]: `decode`, `unpositioned` or `insert` (the
    /// metric's `reason` label).
    pub(super) reason: &'static str,
    /// The error, for the `Sluice-Dead-Letter-Error` header and the log.
    pub(super) detail: String,
}

impl Loader {
    /// Publishes `message` to the dead-letter subject, waits for the
    /// dead-letter stream to acknowledge it, then terminates it.
    pub(super) async fn dead_letter(
        &self,
        message: &jetstream::Message,
        reason: &'static str,
        detail: &str,
    ) -> Result<(), ApplyError> {
        let stream_sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let mut headers = HeaderMap::new();
        headers.insert("Sluice-Dead-Letter-Reason", reason);
        headers.insert(
            "Sluice-Dead-Letter-Error",
            detail.replace(['\r', '\n'], " ").as_str(),
        );
        headers.insert("Sluice-Original-Subject", message.subject.as_str());
        headers.insert(
            "Sluice-Stream-Sequence",
            stream_sequence.to_string().as_str(),
        );
        if let Some(original) = &message.headers {
            for name in [sluice_proto::ENCODING_HEADER, sluice_proto::FORMAT_HEADER] {
                if let Some(value) = original.get(name) {
                    headers.insert(name, value.as_str());
                }
            }
        }
        // Through JetStream, awaiting the dead-letter stream's acknowledgement:
        // the original is terminated only once the copy is stored. Without
        // that stream (or with it unreachable) this fails, the batch is
        // retried, and nothing is terminated.
        jetstream::new(self.nats.clone())
            .publish_with_headers(
                topology::dead_letter_subject(&self.source),
                headers,
                message.payload.clone(),
            )
            .await
            .map_err(|e| ApplyError::DeadLetter(Box::new(e)))?
            .await
            .map_err(|e| ApplyError::DeadLetter(Box::new(e)))?;
        message
            .ack_with(AckKind::Term)
            .await
            .map_err(ApplyError::DeadLetter)?;
        counter!(m::DEAD_LETTERS, "reason" => reason).increment(1);
        tracing::error!(subject = %message.subject, stream_sequence, reason, error = %detail, "message moved to the dead-letter stream");
        Ok(())
    }
}
