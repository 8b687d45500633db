//! Publishing packages to JetStream with a bounded window of in-flight acks.
//!
//! Awaiting each publish ack in turn is ~25x slower than pipelining on this
//! kind of machine, so the [`Publisher`] keeps up to `max_in_flight` acks
//! outstanding. Acks are consumed in publish order, and callers interleave
//! [`Publisher::mark`] calls (e.g. "transaction ending at LSN X is complete"):
//! a mark is released by [`Publisher::poll_released`] only once every package
//! published before it has been acknowledged by the stream (with its
//! replicas). That is the only way the replicator learns which LSN it may
//! confirm to Postgres (ARCHITECTURE.md invariant 1).
//!
//! When the window is full, [`Publisher::publish`] waits for the oldest ack,
//! so back-pressure reaches the caller (and from there the replication socket)
//! instead of the heap.
//!
//! A package larger than the server's `max_payload` goes out as consecutive
//! chunks ([`crate::chunk`]); it counts as acknowledged (and releases marks
//! after it) only once every chunk is.

use std::collections::VecDeque;
use std::pin::Pin;

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use futures::{Future, FutureExt};

/// A publish the stream did not acknowledge. Always transient from the
/// replicator's point of view: reconnect and re-send from the confirmed LSN
/// (dedup IDs make the resend harmless).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publishing to {subject} failed")]
    Send {
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
    #[error("stream did not acknowledge the package on {subject}")]
    Ack {
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
}

type AckFuture = Pin<Box<dyn Future<Output = Result<Ack, PublishError>> + Send>>;

/// What one entry of the window resolved to.
enum Ack {
    Package {
        duplicate: bool,
    },
    /// A chunk of a package other than its last.
    Chunk,
    Mark,
}

/// Headers of a package publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    /// `Nats-Msg-Id`, deterministic (see [`crate::topology::change_msg_id`]).
    pub msg_id: String,
    pub payload: Bytes,
    /// How `payload` is encoded (its `Sluice-Encoding` header).
    pub encoding: sluice_proto::Encoding,
    /// `generation/sequence/commit_lsn/package_index/kind` of the package,
    /// sent as [`crate::chunk::POSITION_HEADER`] when it must be chunked.
    pub position: String,
}

/// Publishes with a bounded window of outstanding acks; see the module docs.
pub struct Publisher<M> {
    js: jetstream::Context,
    window: FuturesOrdered<AckFuture>,
    marks: VecDeque<M>,
    released: Vec<M>,
    max_in_flight: usize,
    /// Largest payload of one message; bigger packages are chunked.
    max_message_bytes: usize,
    duplicates: u64,
    published: u64,
}

/// Room left in a message for headers and protocol overhead.
const HEADER_ROOM: usize = 16 * 1024;

impl<M> Publisher<M> {
    /// A publisher whose messages fit the `max_payload` the connected server
    /// announced (1 MiB when it has not said yet).
    pub fn new(js: jetstream::Context, max_in_flight: usize) -> Self {
        let max_payload = match js.client().server_info().max_payload {
            0 => 1024 * 1024,
            n => n,
        };
        Self::with_max_message_bytes(
            js,
            max_in_flight,
            max_payload.saturating_sub(HEADER_ROOM).max(4096),
        )
    }

    /// A publisher that chunks payloads above `max_message_bytes`.
    pub fn with_max_message_bytes(
        js: jetstream::Context,
        max_in_flight: usize,
        max_message_bytes: usize,
    ) -> Self {
        Publisher {
            js,
            window: FuturesOrdered::new(),
            marks: VecDeque::new(),
            released: Vec::new(),
            max_in_flight: max_in_flight.max(1),
            max_message_bytes: max_message_bytes.max(1),
            duplicates: 0,
            published: 0,
        }
    }

    /// Sends one package (as chunks when it is bigger than a message); waits
    /// for the oldest ack first whenever the window is full.
    pub async fn publish(&mut self, message: Outgoing) -> Result<(), PublishError> {
        let parts = crate::chunk::split(&message.payload, self.max_message_bytes);
        let count = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            while self.window.len() >= self.max_in_flight {
                self.complete_one().await?;
            }
            let mut publish = PublishMessage::build()
                .payload(part)
                .header(sluice_proto::ENCODING_HEADER, message.encoding.as_str())
                .header(sluice_proto::FORMAT_HEADER, sluice_proto::FORMAT_PACKAGE_V1);
            if count == 1 {
                publish = publish.message_id(&message.msg_id);
            } else {
                publish = publish
                    .message_id(format!("{}/{}", message.msg_id, i + 1))
                    .header(crate::chunk::CHUNK_HEADER, format!("{}/{count}", i + 1))
                    .header(crate::chunk::PACKAGE_ID_HEADER, message.msg_id.as_str())
                    .header(crate::chunk::POSITION_HEADER, message.position.as_str());
            }
            let last = i + 1 == count;
            let subject = message.subject.clone();
            let ack = self
                .js
                .send_publish(subject.clone(), publish)
                .await
                .map_err(|source| PublishError::Send {
                    subject: subject.clone(),
                    source,
                })?;
            // Crash tests: the process dies once this chunk is stored and
            // before the next one is sent.
            #[cfg(feature = "failpoints")]
            if !last && fail::eval("broker::publish::between_chunks", |_| ()).is_some() {
                let _ = ack.await;
                eprintln!("failpoint: exiting");
                std::process::exit(86);
            }
            self.window.push_back(Box::pin(async move {
                match ack.await {
                    Ok(ack) if last => Ok(Ack::Package {
                        duplicate: ack.duplicate,
                    }),
                    Ok(_) => Ok(Ack::Chunk),
                    Err(source) => Err(PublishError::Ack { subject, source }),
                }
            }));
        }
        Ok(())
    }

    /// Queues a mark, released once everything published before it is acked.
    pub fn mark(&mut self, mark: M) {
        self.marks.push_back(mark);
        self.window
            .push_back(Box::pin(futures::future::ready(Ok(Ack::Mark))));
    }

    /// Takes the acks that have already arrived without waiting, and returns
    /// the marks they released, oldest first.
    pub fn poll_released(&mut self) -> Result<Vec<M>, PublishError> {
        while let Some(Some(result)) = self.window.next().now_or_never() {
            self.record(result?);
        }
        Ok(std::mem::take(&mut self.released))
    }

    /// Waits for every outstanding ack; returns all released marks.
    pub async fn flush(&mut self) -> Result<Vec<M>, PublishError> {
        while !self.window.is_empty() {
            self.complete_one().await?;
        }
        Ok(std::mem::take(&mut self.released))
    }

    /// Waits until at least one outstanding entry completes (for use in
    /// `select!`); pending forever when nothing is in flight.
    pub async fn wait_one(&mut self) -> Result<(), PublishError> {
        if self.window.is_empty() {
            return futures::future::pending().await;
        }
        self.complete_one().await
    }

    async fn complete_one(&mut self) -> Result<(), PublishError> {
        if let Some(result) = self.window.next().await {
            self.record(result?);
        }
        Ok(())
    }

    fn record(&mut self, ack: Ack) {
        match ack {
            Ack::Package { duplicate } => {
                self.published += 1;
                if duplicate {
                    self.duplicates += 1;
                }
            }
            Ack::Chunk => {}
            Ack::Mark => {
                if let Some(mark) = self.marks.pop_front() {
                    self.released.push(mark);
                }
            }
        }
    }

    /// Entries (packages and marks) not yet completed.
    pub fn in_flight(&self) -> usize {
        self.window.len()
    }

    /// Packages acknowledged so far, and how many of them JetStream reported
    /// as duplicates (already stored under the same `Nats-Msg-Id`).
    pub fn counts(&self) -> (u64, u64) {
        (self.published, self.duplicates)
    }
}
