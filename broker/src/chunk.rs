//! Packages larger than one NATS message, split into consecutive chunks.
//!
//! A package normally travels as one message, but a single row can be
//! bigger than the server's `max_payload` (a 10 MB `bytea`, a 100 MB text).
//! Such a package's payload is cut into parts of at most the message size;
//! each part is a message on the package's subject with
//! - `Sluice-Chunk: i/k` (1-based),
//! - `Sluice-Package-Id: <the package's Nats-Msg-Id>`,
//! - `Sluice-Position: generation/sequence/commit_lsn/package_index/kind`
//!   (so the replicator can resume a chain without reassembling),
//! - `Nats-Msg-Id: <package id>/<i>`, deterministic like every other ID.
//!
//! One subject's messages are stored in publish order, so the parts of a
//! package follow each other on their subject (other subjects may
//! interleave). [`Reassembler`] rebuilds the payload from the parts in
//! order; a part that does not continue the set it belongs to (a retried
//! publish starting again at 1, a set abandoned by a crash) resets it. An
//! incomplete set never yields a package: the chain check then sees the
//! missing package as a gap (invariant 3), never as data.

use std::collections::HashMap;

use async_nats::HeaderMap;
use bytes::Bytes;
use sluice_proto::v1;

pub const CHUNK_HEADER: &str = "Sluice-Chunk";
pub const PACKAGE_ID_HEADER: &str = "Sluice-Package-Id";
pub const POSITION_HEADER: &str = "Sluice-Position";

/// The [`POSITION_HEADER`] value of a package.
pub fn position_of(package: &v1::Package) -> String {
    let (generation, sequence) = package
        .position
        .map_or((0, 0), |p| (p.generation, p.sequence));
    format!(
        "{generation}/{sequence}/{}/{}/{}",
        package.commit_lsn, package.package_index, package.kind
    )
}

/// A package with only what a [`POSITION_HEADER`] says (no rows, no
/// relation): enough to resume a chain or to show it in `status`.
pub fn package_from_position(value: &str) -> Option<v1::Package> {
    let fields: Vec<u64> = value
        .split('/')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let [generation, sequence, commit_lsn, package_index, kind] = fields[..] else {
        return None;
    };
    Some(v1::Package {
        position: Some(v1::ChainPosition {
            generation,
            sequence,
        }),
        commit_lsn,
        package_index: u32::try_from(package_index).ok()?,
        kind: i32::try_from(kind).ok()?,
        ..Default::default()
    })
}

/// Splits `payload` into parts of at most `max` bytes (at least one part).
pub fn split(payload: &Bytes, max: usize) -> Vec<Bytes> {
    let max = max.max(1);
    if payload.len() <= max {
        return vec![payload.clone()];
    }
    (0..payload.len())
        .step_by(max)
        .map(|start| payload.slice(start..(start + max).min(payload.len())))
        .collect()
}

/// The chunk headers of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkInfo {
    /// 1-based index of this part.
    pub index: u32,
    pub count: u32,
    pub package_id: String,
}

/// A chunk header that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("malformed {CHUNK_HEADER} header {value:?} (expected i/k with 1 <= i <= k)")]
pub struct ChunkError {
    pub value: String,
}

/// The message's chunk headers, `None` for a whole package.
pub fn parse(headers: Option<&HeaderMap>) -> Result<Option<ChunkInfo>, ChunkError> {
    let Some(value) = headers.and_then(|h| h.get(CHUNK_HEADER)) else {
        return Ok(None);
    };
    let value = value.as_str();
    let bad = || ChunkError {
        value: value.to_owned(),
    };
    let (index, count) = value.split_once('/').ok_or_else(bad)?;
    let (index, count): (u32, u32) = (
        index.parse().map_err(|_| bad())?,
        count.parse().map_err(|_| bad())?,
    );
    if index == 0 || index > count {
        return Err(bad());
    }
    let package_id = headers
        .and_then(|h| h.get(PACKAGE_ID_HEADER))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    Ok(Some(ChunkInfo {
        index,
        count,
        package_id,
    }))
}

/// What one message contributes.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// A whole package payload: the message itself, or the last part of a
    /// complete set.
    Whole(Bytes),
    /// A part of a set that is not complete yet.
    Part,
}

struct Open {
    package_id: String,
    count: u32,
    next: u32,
    parts: Vec<Bytes>,
    /// Position (in push order) of the set's first part.
    first: usize,
}

/// Rebuilds chunked payloads, per subject; see the module docs.
#[derive(Default)]
pub struct Reassembler {
    open: HashMap<String, Open>,
    pushed: usize,
    /// Sets dropped because they did not continue (count).
    abandoned: u64,
}

impl Reassembler {
    /// Feeds one message of `subject`, in stream order.
    pub fn push(
        &mut self,
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &Bytes,
    ) -> Result<Piece, ChunkError> {
        let position = self.pushed;
        self.pushed += 1;
        let Some(chunk) = parse(headers)? else {
            if self.open.remove(subject).is_some() {
                self.abandoned += 1;
            }
            return Ok(Piece::Whole(payload.clone()));
        };
        // The count must match too: a package re-split with another message
        // size after a crash (its first parts deduplicated by the server)
        // must not complete the old set with parts of the new one.
        let continues = self.open.get(subject).is_some_and(|o| {
            o.package_id == chunk.package_id && o.count == chunk.count && o.next == chunk.index
        });
        if !continues {
            if self.open.remove(subject).is_some() {
                self.abandoned += 1;
            }
            if chunk.index != 1 {
                // A stray later part (its set's start is gone): nothing to build.
                self.abandoned += 1;
                return Ok(Piece::Part);
            }
            self.open.insert(
                subject.to_owned(),
                Open {
                    package_id: chunk.package_id.clone(),
                    count: chunk.count,
                    next: 1,
                    parts: Vec::new(),
                    first: position,
                },
            );
        }
        let open = self.open.get_mut(subject).expect("inserted above");
        open.parts.push(payload.clone());
        open.next += 1;
        if open.next > open.count {
            let open = self.open.remove(subject).expect("present");
            let mut whole = Vec::with_capacity(open.parts.iter().map(Bytes::len).sum());
            for part in &open.parts {
                whole.extend_from_slice(part);
            }
            return Ok(Piece::Whole(whole.into()));
        }
        Ok(Piece::Part)
    }

    /// The push position of the first part of the oldest set still open, if
    /// any: messages from there on cannot be acknowledged yet.
    pub fn oldest_open(&self) -> Option<usize> {
        self.open.values().map(|o| o.first).min()
    }

    /// Whether a set of `subject` is open (waiting for more parts).
    pub fn is_open(&self, subject: &str) -> bool {
        self.open.contains_key(subject)
    }

    /// Sets dropped so far because they did not continue.
    pub fn abandoned(&self) -> u64 {
        self.abandoned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(i: u32, k: u32, id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CHUNK_HEADER, format!("{i}/{k}").as_str());
        h.insert(PACKAGE_ID_HEADER, id);
        h
    }

    #[test]
    fn split_and_reassemble_round_trip_with_interleaving() {
        let payload = Bytes::from((0..10_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let parts = split(&payload, 3000);
        assert_eq!(parts.len(), 4);
        assert_eq!(parts.iter().map(Bytes::len).sum::<usize>(), payload.len());
        let mut r = Reassembler::default();
        for (i, part) in parts.iter().enumerate() {
            let h = headers(i as u32 + 1, 4, "p1");
            let piece = r.push("a", Some(&h), part).unwrap();
            // Another subject's whole package in between does not disturb it.
            assert_eq!(
                r.push("b", None, &Bytes::from_static(b"x")).unwrap(),
                Piece::Whole(Bytes::from_static(b"x"))
            );
            if i < 3 {
                assert_eq!(piece, Piece::Part);
                assert_eq!(r.oldest_open(), Some(0));
            } else {
                assert_eq!(piece, Piece::Whole(payload.clone()));
                assert_eq!(r.oldest_open(), None);
            }
        }
        assert_eq!(split(&Bytes::from_static(b"abc"), 3).len(), 1);
    }

    #[test]
    fn a_restarted_set_replaces_the_partial_one() {
        let mut r = Reassembler::default();
        let (p1, p2) = (Bytes::from_static(b"12"), Bytes::from_static(b"34"));
        assert_eq!(
            r.push("a", Some(&headers(1, 2, "p")), &p1).unwrap(),
            Piece::Part
        );
        // The publisher retried from the start.
        assert_eq!(
            r.push("a", Some(&headers(1, 2, "p")), &p1).unwrap(),
            Piece::Part
        );
        assert_eq!(
            r.push("a", Some(&headers(2, 2, "p")), &p2).unwrap(),
            Piece::Whole(Bytes::from_static(b"1234"))
        );
        assert_eq!(r.abandoned(), 1);
        // A stray second part alone yields nothing.
        assert_eq!(
            r.push("a", Some(&headers(2, 2, "q")), &p2).unwrap(),
            Piece::Part
        );
        assert_eq!(r.oldest_open(), None);
    }

    #[test]
    fn a_part_of_another_split_does_not_complete_a_set() {
        // Found by the fuzz target `chunk`: 2/5 used to complete a set opened by 1/2.
        let mut r = Reassembler::default();
        let part = Bytes::from_static(b"x");
        assert_eq!(
            r.push("a", Some(&headers(1, 2, "p")), &part).unwrap(),
            Piece::Part
        );
        for i in 2..=5 {
            assert_eq!(
                r.push("a", Some(&headers(i, 5, "p")), &part).unwrap(),
                Piece::Part,
                "part {i}/5"
            );
        }
        assert_eq!(r.oldest_open(), None);
        assert_eq!(r.abandoned(), 5);
    }

    #[test]
    fn position_header_round_trips() {
        let package = v1::Package {
            position: Some(v1::ChainPosition {
                generation: 7,
                sequence: 42,
            }),
            commit_lsn: 123_456,
            package_index: 3,
            kind: v1::Kind::Changes as i32,
            ..Default::default()
        };
        let back = package_from_position(&position_of(&package)).unwrap();
        assert_eq!(back.position, package.position);
        assert_eq!(
            (back.commit_lsn, back.package_index, back.kind),
            (123_456, 3, package.kind)
        );
        assert!(package_from_position("1/2/3").is_none());
    }

    #[test]
    fn malformed_headers_are_errors() {
        for value in ["0/2", "3/2", "x/2", "2"] {
            let mut h = HeaderMap::new();
            h.insert(CHUNK_HEADER, value);
            assert!(parse(Some(&h)).is_err(), "{value}");
        }
    }
}
