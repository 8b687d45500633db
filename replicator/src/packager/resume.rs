//! Chain resumption: where each table's chain stood in the stream when the
//! replicator starts (ARCHITECTURE.md invariant 3). Reads the last message of
//! a subject from JetStream and turns it into a [`Resume`] point, also when
//! that message is a chunk of a package too big for one NATS message (see
//! `sluice_broker::chunk`): a cut-short chunk set resumes the chain just
//! before the package it belonged to, so the replay publishes it again under
//! the same sequence and IDs.

use async_nats::HeaderMap;
use async_nats::jetstream;
use sluice_broker::chunk::{self, ChunkInfo};
use sluice_proto::v1;

/// Where a table's chain stood in the stream when the replicator started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub generation: u64,
    /// Sequence of the last package in the stream.
    pub sequence: u64,
    /// Identity of that package: commit LSN (consistent point for snapshot
    /// packages) and index within its transaction.
    pub commit_lsn: u64,
    pub package_index: u32,
    pub kind: v1::Kind,
    /// The newest change package of the table the stream holds: this one,
    /// or the one a resync package names (`v1::Resync::changes_through_lsn`).
    pub changes_through: Option<(u64, u32)>,
}

impl Resume {
    /// Reads the resume point from the last package of a table's subject.
    pub fn from_package(package: &v1::Package) -> Option<Resume> {
        let position = package.position?;
        let kind = v1::Kind::try_from(package.kind).unwrap_or(v1::Kind::Unspecified);
        let changes_through = if kind == v1::Kind::Changes || kind == v1::Kind::Truncate {
            Some((package.commit_lsn, package.package_index))
        } else {
            package
                .resync
                .as_ref()
                .filter(|r| r.changes_through_lsn > 0)
                .map(|r| (r.changes_through_lsn, r.changes_through_index))
        };
        Some(Resume {
            generation: position.generation,
            sequence: position.sequence,
            commit_lsn: package.commit_lsn,
            package_index: package.package_index,
            kind,
            changes_through,
        })
    }
}

/// The last message of a subject could not be read from the stream.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the last package of {subject} from the stream")]
pub struct StreamReadError {
    pub subject: String,
    #[source]
    pub source: jetstream::stream::LastRawMessageError,
}

/// The last package on `subject`, if any.
pub async fn last_package(
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> Result<Option<v1::Package>, StreamReadError> {
    // Read from the stream leader: a lagging replica could hide the newest
    // package and make the chain resume too early.
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Ok(package_of_last_message(
            subject,
            &message.headers,
            &message.payload,
        )),
        Err(error)
            if matches!(
                error.kind(),
                jetstream::stream::LastRawMessageErrorKind::NoMessageFound
            ) =>
        {
            Ok(None)
        }
        Err(source) => Err(StreamReadError {
            subject: subject.to_owned(),
            source,
        }),
    }
}

/// The package (or, for a chunk, the position) the last message of a
/// subject stands for; `None` when it cannot be read, which starts a new
/// chain (logged).
fn package_of_last_message(
    subject: &str,
    headers: &HeaderMap,
    payload: &[u8],
) -> Option<v1::Package> {
    match chunk::parse(Some(headers)) {
        Ok(Some(chunk)) => return last_chunked_package(subject, headers, &chunk),
        Ok(None) => {}
        Err(error) => {
            tracing::error!(subject = %subject, error = %error, "last message on the subject has a bad chunk header; starting a new chain");
            return None;
        }
    }
    let encoding = headers
        .get(sluice_proto::ENCODING_HEADER)
        .map(|v| v.as_str().to_owned());
    match sluice_proto::decode(payload, encoding.as_deref()) {
        Ok(package) => Some(package),
        Err(error) => {
            tracing::error!(subject = %subject, error = %error, "last package on the subject does not decode; starting a new chain");
            None
        }
    }
}

/// The resume point when the last message of a subject is a chunk (see
/// `sluice_broker::chunk`), from its position header. The last chunk of a
/// set means the whole package is in the stream. An earlier chunk means a
/// publish was cut short (a crash): the package is not in the stream (its
/// transaction was never confirmed, so it is replayed), and the chain
/// resumes just before it, so the replay publishes it again under the same
/// sequence and IDs.
fn last_chunked_package(
    subject: &str,
    headers: &HeaderMap,
    chunk: &ChunkInfo,
) -> Option<v1::Package> {
    let position = headers
        .get(chunk::POSITION_HEADER)
        .and_then(|v| chunk::package_from_position(v.as_str()));
    let Some(mut package) = position else {
        tracing::error!(subject = %subject, "last chunk on the subject has no readable position header; starting a new chain");
        return None;
    };
    if chunk.index < chunk.count {
        let position = package.position.as_mut()?;
        position.sequence = position.sequence.saturating_sub(1);
        if package.package_index > 0 {
            package.package_index -= 1;
        } else {
            package.commit_lsn = package.commit_lsn.saturating_sub(1);
            package.package_index = u32::MAX;
        }
    }
    Some(package)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(sequence: u64, commit_lsn: u64, package_index: u32) -> v1::Package {
        v1::Package {
            position: Some(v1::ChainPosition {
                generation: 7,
                sequence,
            }),
            commit_lsn,
            package_index,
            kind: v1::Kind::Changes as i32,
            ..Default::default()
        }
    }

    fn chunk_headers(index: u32, count: u32, position: Option<&v1::Package>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(chunk::CHUNK_HEADER, format!("{index}/{count}").as_str());
        headers.insert(chunk::PACKAGE_ID_HEADER, "slot:1:0");
        if let Some(package) = position {
            headers.insert(chunk::POSITION_HEADER, chunk::position_of(package).as_str());
        }
        headers
    }

    fn resume(package: Option<v1::Package>) -> Option<Resume> {
        package.as_ref().and_then(Resume::from_package)
    }

    #[test]
    fn a_whole_package_resumes_after_itself() {
        let last = package(5, 0x100, 2);
        let mut headers = HeaderMap::new();
        headers.insert(sluice_proto::ENCODING_HEADER, "zstd");
        let payload = sluice_proto::encode(&last, sluice_proto::Encoding::Zstd);
        let read = package_of_last_message("s", &headers, &payload);
        assert_eq!(read, Some(last.clone()));
        assert_eq!(
            resume(read),
            Some(Resume {
                generation: 7,
                sequence: 5,
                commit_lsn: 0x100,
                package_index: 2,
                kind: v1::Kind::Changes,
                changes_through: Some((0x100, 2)),
            })
        );
    }

    #[test]
    fn the_last_chunk_of_a_set_resumes_after_its_package() {
        let last = package(5, 0x100, 2);
        let headers = chunk_headers(3, 3, Some(&last));
        let read = package_of_last_message("s", &headers, b"not a package");
        assert_eq!(resume(read), Resume::from_package(&last));
    }

    #[test]
    fn a_cut_short_chunk_set_resumes_just_before_its_package() {
        // Not the first package of its transaction: the previous index.
        let cut = package(5, 0x100, 2);
        let headers = chunk_headers(1, 3, Some(&cut));
        let read = resume(package_of_last_message("s", &headers, b"part")).unwrap();
        assert_eq!(
            (read.sequence, read.commit_lsn, read.package_index),
            (4, 0x100, 1)
        );
        // The first package of its transaction: after every package of any
        // earlier transaction, before this one.
        let cut = package(5, 0x100, 0);
        let headers = chunk_headers(2, 3, Some(&cut));
        let read = resume(package_of_last_message("s", &headers, b"part")).unwrap();
        assert_eq!(
            (read.sequence, read.commit_lsn, read.package_index),
            (4, 0xff, u32::MAX)
        );
        assert_eq!(read.generation, 7);
    }

    #[test]
    fn unreadable_last_messages_start_a_new_chain() {
        // A chunk without its position header.
        let headers = chunk_headers(3, 3, None);
        assert_eq!(package_of_last_message("s", &headers, b""), None);
        // A chunk header that does not parse.
        let mut headers = HeaderMap::new();
        headers.insert(chunk::CHUNK_HEADER, "4/3");
        assert_eq!(package_of_last_message("s", &headers, b""), None);
        // A payload that does not decode.
        assert_eq!(
            package_of_last_message("s", &HeaderMap::new(), b"\xff\xff\xff"),
            None
        );
    }
}
