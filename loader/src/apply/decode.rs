//! The decode stage: a fetched batch's payloads reassembled from their
//! chunks, decompressed, decoded, and the rows of row packages encoded to
//! RowBinary ahead of their INSERT.
//!
//! This is the CPU-heavy half of applying a batch. [`split`] cuts a fetch
//! into parts whose decompressed size stays within
//! `loader.batch_max_decoded_bytes`, and [`Pending::decode`] runs each on
//! [`DECODE_THREADS`] threads while the previous part's INSERTs run; a part
//! comes out in stream order again. A payload that cannot be decoded (or
//! decompresses past the budget) is kept as its reason, for the plan to
//! dead-letter (ARCHITECTURE.md invariant 6).

use std::sync::Arc;

use async_nats::jetstream;
use sluice_broker::TableName;
use sluice_proto::v1;

use super::HeldTables;
use crate::clickhouse::schema::TargetTable;
use crate::clickhouse::{EncodedRows, Error as ChError};

/// A fetched batch, or a part of one, with its payloads decompressed,
/// decoded and their rows encoded: the CPU-heavy half of applying it, done
/// by [`Pending::decode`] while the previous part's INSERTs run.
pub struct Batch {
    /// All the messages of the fetch (decoded packages name theirs by index).
    pub messages: Arc<Vec<jetstream::Message>>,
    /// Per whole package (a chunked one at its last chunk): the index of its
    /// message and the package, or why it cannot be decoded.
    pub(super) decoded: Vec<(usize, Result<Decoded, String>)>,
    /// The last part of its fetch: the fetch is acked once it is applied.
    pub last_part: bool,
}

impl Batch {
    /// Whether the fetch brought nothing (the wait expired).
    pub fn is_idle(&self) -> bool {
        self.messages.is_empty()
    }
}

/// A decoded package and, where they could be encoded on their own, its rows
/// in RowBinary.
pub(super) struct Decoded {
    /// Without its rows when `rows` holds them encoded.
    pub(super) package: v1::Package,
    pub(super) rows: Option<EncodedRows>,
    /// The package as stored, kept exactly when `package` lacks its rows, to
    /// decode them after all for an INSERT that fills in TOAST values, or
    /// for one sent again after its compressed rows went out once. The
    /// stored (compressed) bytes share the fetched message's buffer; keeping
    /// the decompressed ones instead doubled a part's memory for a path few
    /// INSERTs take.
    pub(super) stored: Option<Stored>,
}

/// A package payload as stored, and how to decompress it again.
pub(super) struct Stored {
    payload: bytes::Bytes,
    encoding: Option<String>,
    /// The most it may decompress to (it did, once).
    limit: usize,
}

impl Decoded {
    /// A package decoded whole (no rows encoded ahead).
    pub(super) fn whole(package: v1::Package) -> Decoded {
        Decoded {
            package,
            rows: None,
            stored: None,
        }
    }

    /// The package with its rows.
    pub(super) fn with_rows(&self) -> Result<std::borrow::Cow<'_, v1::Package>, ChError> {
        let Some(stored) = &self.stored else {
            return match self.rows {
                // Not reached: encoded packages keep their stored bytes.
                Some(_) => Err(ChError::Decode(sluice_proto::DecodeError::Wire(
                    "the package's rows were not kept",
                ))),
                None => Ok(std::borrow::Cow::Borrowed(&self.package)),
            };
        };
        let raw = sluice_proto::decompress_limited(
            &stored.payload,
            stored.encoding.as_deref(),
            stored.limit,
        )
        .map_err(ChError::Decode)?;
        sluice_proto::package_with_rows(&raw)
            .map(std::borrow::Cow::Owned)
            .map_err(ChError::Decode)
    }
}

/// A whole package payload, still compressed, by the index of its (last)
/// message; or why it could not be put together.
type Payload = (usize, Result<bytes::Bytes, String>);

/// A part of a fetch waiting to be decoded: packages whose decompressed
/// sizes, as far as they can be known before decompressing, add up to at
/// most the budget (a single package may take the whole budget).
pub struct Pending {
    messages: Arc<Vec<jetstream::Message>>,
    payloads: Vec<Payload>,
    last_part: bool,
    /// The most one package may decompress to.
    limit: usize,
}

/// Reassembles a fetch's chunked packages (the caller holds back incomplete
/// sets) and cuts its packages into parts of at most `budget` decompressed
/// bytes, in stream order. There is always at least one part, so an empty
/// fetch still makes an (idle) batch.
///
/// The sizes are bounds known from the payloads' headers
/// ([`sluice_proto::decoded_size_bound`]); decompression is held to them,
/// so no part decompresses to more than `budget` whatever the bytes claim.
/// A package refused at once (stated over the budget) counts nothing here
/// and fails as too large when decoded.
///
/// Messages whose subject `passed_over` accepts (the tables another loader
/// applies) are not decoded at all; they stay in the batch to be acked.
pub fn split(
    messages: Vec<jetstream::Message>,
    budget: usize,
    passed_over: impl Fn(&str) -> bool,
) -> Vec<Pending> {
    let mut chunks = sluice_broker::chunk::Reassembler::default();
    let mut parts: Vec<Vec<Payload>> = vec![Vec::new()];
    let mut used = 0usize;
    for (index, message) in messages.iter().enumerate() {
        if passed_over(message.subject.as_str()) {
            continue;
        }
        let payload = match chunks.push(
            message.subject.as_str(),
            message.headers.as_ref(),
            &message.payload,
        ) {
            Ok(sluice_broker::chunk::Piece::Whole(payload)) => payload,
            Ok(sluice_broker::chunk::Piece::Part) => continue,
            Err(error) => {
                parts
                    .last_mut()
                    .expect("never empty")
                    .push((index, Err(sluice_broker::error_chain(&error))));
                continue;
            }
        };
        let size =
            sluice_proto::decoded_size_bound(&payload, encoding_of(message), budget).unwrap_or(0);
        let current = parts.last_mut().expect("never empty");
        if !current.is_empty() && used + size > budget {
            parts.push(Vec::new());
            used = 0;
        }
        used += size;
        parts
            .last_mut()
            .expect("never empty")
            .push((index, Ok(payload)));
    }
    let messages = Arc::new(messages);
    let count = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, payloads)| Pending {
            messages: messages.clone(),
            payloads,
            last_part: i + 1 == count,
            limit: budget,
        })
        .collect()
}

fn encoding_of(message: &jetstream::Message) -> Option<&str> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(sluice_proto::ENCODING_HEADER))
        .map(|v| v.as_str())
}

impl Pending {
    /// Decodes every package and encodes the rows of every row package on
    /// `DECODE_THREADS` threads (the part is in order again afterwards),
    /// compressed for the INSERT with `compression`. Change packages of the
    /// tables `held` says are being resynced keep their RowBinary beside the
    /// compressed chunk (see [`EncodedRows`]).
    pub fn decode(self, compression: clickhouse::Compression, held: &HeldTables) -> Batch {
        let share = self.payloads.len().div_ceil(DECODE_THREADS).max(1);
        let messages_ref = &self.messages;
        let limit = self.limit;
        let decoded = std::thread::scope(|scope| {
            let threads: Vec<_> = self
                .payloads
                .chunks(share)
                .map(|part| {
                    scope.spawn(move || decode_part(messages_ref, part, limit, compression, held))
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|thread| match thread.join() {
                    Ok(part) => part,
                    Err(panic) => std::panic::resume_unwind(panic),
                })
                .collect()
        });
        Batch {
            messages: self.messages,
            decoded,
            last_part: self.last_part,
        }
    }
}

/// Threads that decode one batch. Two: on a small machine ClickHouse needs
/// the rest, and the decoding of one batch overlaps the INSERTs of the last.
const DECODE_THREADS: usize = 2;

/// Decodes whole package payloads (by message index) and encodes their rows.
fn decode_part(
    messages: &[jetstream::Message],
    part: &[Payload],
    limit: usize,
    compression: clickhouse::Compression,
    held: &HeldTables,
) -> Vec<(usize, Result<Decoded, String>)> {
    let mut encoder = RowEncoder {
        reader: sluice_proto::rows::RowReader::default(),
        last_target: None,
        copy_decoder: None,
        compression,
        held,
    };
    let mut decode = |index: usize, payload: &bytes::Bytes| {
        let encoding = encoding_of(&messages[index]);
        let raw = match sluice_proto::decompress_limited(payload, encoding, limit)
            .map_err(|error| sluice_broker::error_chain(&error))?
        {
            // Uncompressed: the payload itself.
            std::borrow::Cow::Borrowed(_) => payload.clone(),
            std::borrow::Cow::Owned(raw) => bytes::Bytes::from(raw),
        };
        if let Some(mut decoded) = encoder.encode(&raw) {
            decoded.stored = Some(Stored {
                payload: payload.clone(),
                encoding: encoding.map(str::to_owned),
                limit,
            });
            return Ok(decoded);
        }
        // A snapshot package's `COPY` text becomes its rows, or the package
        // is refused naming the line and column at fault (never the value).
        let package = sluice_proto::package_with_rows(&raw)
            .map_err(|error| sluice_broker::error_chain(&error))?;
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
struct RowEncoder<'h> {
    reader: sluice_proto::rows::RowReader,
    /// The target of the last relation seen: packages of a table come in
    /// runs with the same relation. Only its columns matter here, so the
    /// database name is left empty.
    last_target: Option<(TableName, v1::Relation, TargetTable)>,
    /// The `COPY` text decoder for the last target's relation, made at its
    /// first snapshot package that carries `copy_text`.
    copy_decoder: Option<sluice_proto::values::copy::RowDecoder>,
    /// How the encoded rows are compressed for their INSERT.
    compression: clickhouse::Compression,
    /// Which tables are being resynced.
    held: &'h HeldTables,
}

impl RowEncoder<'_> {
    /// The package in `raw` with its rows encoded, or `None` to decode it
    /// whole instead: not a row package, or rows that do not encode on their
    /// own (see [`EncodedRows::transcode`]), or bytes prost should judge.
    fn encode(&mut self, raw: &bytes::Bytes) -> Option<Decoded> {
        let split = sluice_proto::rows::split(raw).ok()?;
        let package = &split.header;
        let row_kind =
            package.kind == v1::Kind::Changes as i32 || package.kind == v1::Kind::Snapshot as i32;
        let relation = package.relation.as_ref()?;
        // Snapshot rows as `COPY` text (a package with both is decoded
        // whole, and refused there if it does not hold together).
        let copy_text = match &split.copy_text {
            Some(range) if package.kind == v1::Kind::Snapshot as i32 && split.rows.is_empty() => {
                Some(raw.get(range.clone())?)
            }
            Some(_) => return None,
            None => None,
        };
        if !row_kind || (split.rows.is_empty() && copy_text.is_none()) {
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
            self.copy_decoder = None;
        }
        let (table, _, target) = self.last_target.as_ref()?;
        // Into the live table and the shadow: the second INSERT needs it.
        let keep_body = package.kind == v1::Kind::Changes as i32 && self.held.is_resyncing(table);
        let rows = match copy_text {
            Some(text) => {
                if self.copy_decoder.is_none() {
                    self.copy_decoder =
                        Some(sluice_proto::values::copy::RowDecoder::new(relation).ok()?);
                }
                EncodedRows::transcode_copy(
                    target,
                    package,
                    text,
                    self.copy_decoder.as_mut()?,
                    self.compression,
                    keep_body,
                )?
            }
            None => EncodedRows::transcode(
                target,
                package,
                raw,
                &split.rows,
                &mut self.reader,
                self.compression,
                keep_body,
            )?,
        };
        Some(Decoded {
            package: split.header,
            rows: Some(rows),
            stored: None,
        })
    }
}
