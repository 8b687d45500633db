//! The decode stage: a fetched batch's payloads reassembled from their
//! chunks, decompressed, decoded, and the rows of row packages encoded to
//! RowBinary ahead of their INSERT.
//!
//! This is the CPU-heavy half of applying a batch. [`Batch::decode`] runs it
//! on [`DECODE_THREADS`] threads while the previous batch's INSERTs run; the
//! batch comes out in stream order again. A payload that cannot be decoded is
//! kept as its reason, for the plan to dead-letter (ARCHITECTURE.md
//! invariant 6).

use async_nats::jetstream;
use sluice_broker::TableName;
use sluice_proto::{Message as _, v1};

use crate::clickhouse::schema::TargetTable;
use crate::clickhouse::{EncodedRows, Error as ChError};

/// A fetched batch with its payloads decompressed, decoded and their rows
/// encoded: the CPU-heavy half of applying it, done by [`Batch::decode`]
/// while the previous batch's INSERTs run.
pub struct Batch {
    pub messages: Vec<jetstream::Message>,
    /// Per whole package (a chunked one at its last chunk): the index of its
    /// message and the package, or why it cannot be decoded.
    pub(super) decoded: Vec<(usize, Result<Decoded, String>)>,
}

/// A decoded package and, where they could be encoded on their own, its rows
/// in RowBinary.
pub(super) struct Decoded {
    /// Without its rows when `rows` holds them encoded.
    pub(super) package: v1::Package,
    pub(super) rows: Option<EncodedRows>,
    /// The package's protobuf bytes, kept exactly when `package` lacks its
    /// rows, to decode them after all for an INSERT that fills in TOAST values.
    pub(super) raw: Option<bytes::Bytes>,
}

impl Decoded {
    /// A package decoded whole (no rows encoded ahead).
    pub(super) fn whole(package: v1::Package) -> Decoded {
        Decoded {
            package,
            rows: None,
            raw: None,
        }
    }

    /// The package with its rows.
    pub(super) fn with_rows(&self) -> Result<std::borrow::Cow<'_, v1::Package>, ChError> {
        match &self.raw {
            Some(raw) => v1::Package::decode(raw.as_ref())
                .map(std::borrow::Cow::Owned)
                .map_err(|e| ChError::Decode(sluice_proto::DecodeError::Protobuf(e))),
            None => Ok(std::borrow::Cow::Borrowed(&self.package)),
        }
    }
}

impl Batch {
    /// Reassembles chunked packages (the caller holds back incomplete sets),
    /// then decodes every package and encodes the rows of every row package
    /// on `DECODE_THREADS` threads (the batch is in order again afterwards).
    pub fn decode(messages: Vec<jetstream::Message>) -> Batch {
        let mut chunks = sluice_broker::chunk::Reassembler::default();
        let mut whole = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            match chunks.push(
                message.subject.as_str(),
                message.headers.as_ref(),
                &message.payload,
            ) {
                Ok(sluice_broker::chunk::Piece::Whole(payload)) => {
                    whole.push((index, Ok(payload)));
                }
                Ok(sluice_broker::chunk::Piece::Part) => {}
                Err(error) => whole.push((index, Err(sluice_broker::error_chain(&error)))),
            }
        }
        let share = whole.len().div_ceil(DECODE_THREADS).max(1);
        let messages_ref = &messages;
        let decoded = std::thread::scope(|scope| {
            let threads: Vec<_> = whole
                .chunks(share)
                .map(|part| scope.spawn(move || decode_part(messages_ref, part)))
                .collect();
            threads
                .into_iter()
                .flat_map(|thread| match thread.join() {
                    Ok(part) => part,
                    Err(panic) => std::panic::resume_unwind(panic),
                })
                .collect()
        });
        Batch { messages, decoded }
    }
}

/// Threads that decode one batch. Two: on a small machine ClickHouse needs
/// the rest, and the decoding of one batch overlaps the INSERTs of the last.
const DECODE_THREADS: usize = 2;

/// Decodes whole package payloads (by message index) and encodes their rows.
fn decode_part(
    messages: &[jetstream::Message],
    part: &[(usize, Result<bytes::Bytes, String>)],
) -> Vec<(usize, Result<Decoded, String>)> {
    let mut encoder = RowEncoder::default();
    let mut decode = |index: usize, payload: &bytes::Bytes| {
        let encoding = messages[index]
            .headers
            .as_ref()
            .and_then(|h| h.get(sluice_proto::ENCODING_HEADER))
            .map(|v| v.as_str());
        let raw = match sluice_proto::decompress(payload, encoding)
            .map_err(|error| sluice_broker::error_chain(&error))?
        {
            // Uncompressed: the payload itself.
            std::borrow::Cow::Borrowed(_) => payload.clone(),
            std::borrow::Cow::Owned(raw) => bytes::Bytes::from(raw),
        };
        if let Some(decoded) = encoder.encode(&raw) {
            return Ok(decoded);
        }
        let package = v1::Package::decode(&*raw).map_err(|error| {
            sluice_broker::error_chain(&sluice_proto::DecodeError::Protobuf(error))
        })?;
        Ok(Decoded::whole(package))
    };
    part.iter()
        .map(|(index, payload)| {
            let decoded = match payload {
                Ok(payload) => decode(*index, payload),
                Err(error) => Err(error.clone()),
            };
            (*index, decoded)
        })
        .collect()
}

/// Encodes the rows of CHANGES and SNAPSHOT packages straight from their
/// protobuf bytes, for their relation's columns.
#[derive(Default)]
struct RowEncoder {
    reader: sluice_proto::rows::RowReader,
    /// The target of the last relation seen: packages of a table come in
    /// runs with the same relation. Only its columns matter here, so the
    /// database name is left empty.
    last_target: Option<(TableName, v1::Relation, TargetTable)>,
}

impl RowEncoder {
    /// The package in `raw` with its rows encoded, or `None` to decode it
    /// whole instead: not a row package, or rows that do not encode on their
    /// own (see [`EncodedRows::transcode`]), or bytes prost should judge.
    fn encode(&mut self, raw: &bytes::Bytes) -> Option<Decoded> {
        let split = sluice_proto::rows::split(raw).ok()?;
        let package = &split.header;
        let row_kind =
            package.kind == v1::Kind::Changes as i32 || package.kind == v1::Kind::Snapshot as i32;
        let relation = package.relation.as_ref()?;
        if !row_kind || split.rows.is_empty() {
            return None;
        }
        let same = self.last_target.as_ref().is_some_and(|(table, r, _)| {
            table.schema == package.schema && table.name == package.table && r == relation
        });
        if !same {
            let target =
                TargetTable::from_relation("", &package.schema, &package.table, relation).ok()?;
            self.last_target = Some((
                TableName::new(&package.schema, &package.table),
                relation.clone(),
                target,
            ));
        }
        let (_, _, target) = self.last_target.as_ref()?;
        let rows = EncodedRows::transcode(target, package, raw, &split.rows, &mut self.reader)?;
        Some(Decoded {
            package: split.header,
            rows: Some(rows),
            raw: Some(raw.clone()),
        })
    }
}
