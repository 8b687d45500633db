//! Decoder of the messages the `pgoutput` logical decoding plugin produces, protocol versions 1 and 2.
//!
//! The input is the payload of one XLogData message of the streaming-replication protocol (the bytes
//! after its 1 + 8 + 8 + 8 byte header), or one `data` row of `pg_logical_slot_*_binary_changes`. The
//! layout of every message is in the Postgres docs, "Logical Replication Message Formats"
//! (<https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>), built from the
//! types of "Message Data Types" (<https://www.postgresql.org/docs/15/protocol-message-types.html>):
//! big-endian integers, NUL-terminated strings, a one-byte tag first.
//!
//! # Guarantees
//! The bytes come from the network, so this module is responsible for invariant 6 of ARCHITECTURE.md
//! (bad input gets a clear error): **decoding never panics**, whatever the input. Every read is checked
//! and fails with a [`DecodeError`] naming the message and the field being read; counts announced by the
//! message never size an allocation beyond the bytes actually present; a message must be consumed
//! exactly (trailing bytes are an error, so a truncated or mis-framed message cannot pass as a shorter
//! one). The module does no I/O; `cargo test -p sluice-replicator pgoutput` decodes real captured
//! messages (`tests/fixtures/pgoutput/`) and every prefix of them, and `replicator/fuzz/` is a
//! cargo-fuzz target (`cargo +nightly fuzz run pgoutput -- -max_total_time=60` in `replicator/fuzz`).
//!
//! Values are not copied: text and binary column values and logical-message contents are
//! [`Bytes`] slices of the input buffer. Names (schemas, tables, columns, types, prefixes) are
//! `String`s and must be valid UTF-8 (the replicator requires a UTF-8 server encoding).
//!
//! # What the caller must know
//! - **Timestamps** are converted from the Postgres epoch (2000-01-01) to microseconds since the UNIX
//!   epoch (`*_time_us` fields), saturating at the `i64` range (Postgres' `infinity` stays huge).
//! - **LSNs**: [`Begin::final_lsn`] equals the [`Commit::commit_lsn`] of the same transaction (the LSN of
//!   its commit record); [`Commit::end_lsn`] is the position to confirm once the transaction is durable.
//! - **Protocol v2 streaming** (`streaming 'on'`): a large transaction arrives before it commits, in
//!   blocks between [`LogicalMessage::StreamStart`] and [`LogicalMessage::StreamStop`], interleaved with
//!   other transactions, and ends with [`LogicalMessage::StreamCommit`] or
//!   [`LogicalMessage::StreamAbort`] (outside any block). Inside a block, Relation, Type, Insert, Update,
//!   Delete, Truncate and Message carry the xid of their (sub)transaction; the [`Decoder`] tracks the
//!   block state to know whether that field is present, so one `Decoder` must see every message of a
//!   connection in order, and a new connection needs a new `Decoder`. Outside stream blocks the `xid`
//!   fields are `None`. With protocol v1 no Stream message can occur.
//! - **Column counts**: tuples are checked against nothing here (the decoder keeps no relation cache);
//!   [`Relation::check_tuple`] does it for callers that hold the relation.
//! - Two-phase messages (protocol v3, `two_phase 'on'`) are not supported: their tags are unknown here.

use std::fmt;
use std::str::Utf8Error;

use bytes::{Buf, Bytes};

/// Microseconds from 1970-01-01 (UNIX epoch) to 2000-01-01 (Postgres epoch).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Converts a Postgres `TimestampTz` (microseconds since 2000-01-01 UTC) to microseconds since the UNIX
/// epoch, saturating instead of overflowing.
pub fn pg_time_to_unix_us(pg_time_us: i64) -> i64 {
    pg_time_us.saturating_add(PG_EPOCH_OFFSET_US)
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    /// `B`: a (non-streamed) transaction starts.
    Begin(Begin),
    /// `C`: the transaction started by the last [`LogicalMessage::Begin`] committed.
    Commit(Commit),
    /// `O`: the transaction was replicated into this server from another one (replication origin).
    Origin(Origin),
    /// `R`: the layout of a table; sent before the first change of the table on the connection and again
    /// whenever it changed.
    Relation(Relation),
    /// `Y`: the name of a non-built-in data type used by a following Relation.
    Type(TypeMsg),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: tables were truncated.
    Truncate(Truncate),
    /// `M`: a message written with `pg_logical_emit_message` (only with `messages 'true'`).
    Message(LogicalDecodingMessage),
    /// `S` (v2): a block of a streamed, still running transaction starts.
    StreamStart(StreamStart),
    /// `E` (v2): the current stream block ends.
    StreamStop,
    /// `c` (v2): a streamed transaction committed.
    StreamCommit(StreamCommit),
    /// `A` (v2): a streamed transaction or one of its subtransactions aborted.
    StreamAbort(StreamAbort),
}

impl LogicalMessage {
    /// The message kind, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Begin(_) => "Begin",
            Self::Commit(_) => "Commit",
            Self::Origin(_) => "Origin",
            Self::Relation(_) => "Relation",
            Self::Type(_) => "Type",
            Self::Insert(_) => "Insert",
            Self::Update(_) => "Update",
            Self::Delete(_) => "Delete",
            Self::Truncate(_) => "Truncate",
            Self::Message(_) => "Message",
            Self::StreamStart(_) => "Stream Start",
            Self::StreamStop => "Stream Stop",
            Self::StreamCommit(_) => "Stream Commit",
            Self::StreamAbort(_) => "Stream Abort",
        }
    }
}

/// `B`: start of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record of the transaction (equal to [`Commit::commit_lsn`]).
    pub final_lsn: u64,
    /// Commit time, microseconds since the UNIX epoch.
    pub commit_time_us: i64,
    /// Transaction id.
    pub xid: u32,
}

/// `C`: end of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Currently always 0.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: u64,
    /// End LSN of the transaction: what to confirm to the server once everything before it is durable.
    pub end_lsn: u64,
    /// Commit time, microseconds since the UNIX epoch.
    pub commit_time_us: i64,
}

/// `O`: replication origin of the current transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// LSN of the commit on the origin server.
    pub commit_lsn: u64,
    /// Name of the origin.
    pub name: String,
}

/// `R`: table layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Xid of the streamed (sub)transaction, inside a stream block only.
    pub xid: Option<u32>,
    /// OID of the table; the `relation_oid` of changes refers to it.
    pub oid: u32,
    /// Schema name (`pg_catalog` is sent as an empty string).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// `relreplident`: `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// The published columns, in the order tuples list their values.
    pub columns: Vec<RelationColumn>,
}

impl Relation {
    /// Checks that `tuple` has one value per column of this relation (old key tuples too: pgoutput
    /// sends the non-key columns of a key tuple as nulls).
    pub fn check_tuple(&self, tuple: &TupleData) -> Result<(), DecodeError> {
        if tuple.len() == self.columns.len() {
            Ok(())
        } else {
            Err(DecodeError::ColumnCountMismatch {
                relation_oid: self.oid,
                expected: self.columns.len(),
                found: tuple.len(),
            })
        }
    }
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (flag bit 1).
    pub key: bool,
    /// Column name.
    pub name: String,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// `atttypmod` (e.g. length of `varchar(n)` + 4; -1 when there is none).
    pub type_modifier: i32,
}

/// `Y`: a data type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMsg {
    /// Xid of the streamed (sub)transaction, inside a stream block only.
    pub xid: Option<u32>,
    /// OID of the type.
    pub oid: u32,
    /// Schema name (`pg_catalog` is sent as an empty string).
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// `I`: inserted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// Xid of the streamed (sub)transaction, inside a stream block only.
    pub xid: Option<u32>,
    /// OID of the table, announced by an earlier [`Relation`].
    pub relation_oid: u32,
    /// The new row.
    pub new: TupleData,
}

/// `U`: updated row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Xid of the streamed (sub)transaction, inside a stream block only.
    pub xid: Option<u32>,
    /// OID of the table, announced by an earlier [`Relation`].
    pub relation_oid: u32,
    /// The old row: `Key` when the replica identity columns changed (identity `DEFAULT`/`INDEX`),
    /// `Full` with identity `FULL`; `None` when the identity is unchanged.
    pub old: Option<OldTuple>,
    /// The new row; unchanged TOASTed values are [`TupleValue::UnchangedToast`].
    pub new: TupleData,
}

/// `D`: deleted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// Xid of the streamed (sub)transaction, inside a stream block only.
    pub xid: Option<u32>,
    /// OID of the table, announced by an earlier [`Relation`].
    pub relation_oid: u32,
    /// The replica identity of the deleted row (`Key`) or the whole row (`Full`).
    pub old: OldTuple,
}

/// `T`: truncated tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Xid of the streamed (sub)transaction, inside a stream block only.
    pub xid: Option<u32>,
    /// `TRUNCATE ... CASCADE` (option bit 1).
    pub cascade: bool,
    /// `TRUNCATE ... RESTART IDENTITY` (option bit 2).
    pub restart_identity: bool,
    /// OIDs of the truncated tables.
    pub relation_oids: Vec<u32>,
}

/// `M`: a logical decoding message (`pg_logical_emit_message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalDecodingMessage {
    /// Xid of the streamed (sub)transaction, inside a stream block only.
    pub xid: Option<u32>,
    /// Part of a transaction (between Begin and Commit) rather than sent immediately.
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: u64,
    /// Prefix given by the emitter.
    pub prefix: String,
    /// Content, arbitrary bytes.
    pub content: Bytes,
}

/// `S`: start of a stream block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// Xid of the streamed top-level transaction.
    pub xid: u32,
    /// First block of this transaction.
    pub first_segment: bool,
}

/// `c`: a streamed transaction committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    /// Xid of the streamed top-level transaction.
    pub xid: u32,
    /// Currently always 0.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: u64,
    /// End LSN of the transaction.
    pub end_lsn: u64,
    /// Commit time, microseconds since the UNIX epoch.
    pub commit_time_us: i64,
}

/// `A`: a streamed transaction (when `subxid == xid`) or one of its subtransactions aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    /// Xid of the streamed top-level transaction.
    pub xid: u32,
    /// Xid of the aborted subtransaction (equal to `xid` for the whole transaction).
    pub subxid: u32,
    /// LSN of the abort; only sent by protocol v4 with `streaming 'parallel'`.
    pub abort_lsn: Option<u64>,
    /// Abort time (UNIX epoch micros); only sent by protocol v4 with `streaming 'parallel'`.
    pub abort_time_us: Option<i64>,
}

/// The values of one row, one per column of its [`Relation`], in column order.
pub type TupleData = Vec<TupleValue>;

/// One column value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: a TOASTed value that did not change; the value itself is not sent.
    UnchangedToast,
    /// `t`: the value in the type's text output format.
    Text(Bytes),
    /// `b`: the value in the type's binary format (only with `binary 'true'`).
    Binary(Bytes),
}

/// The old row of an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: the replica identity columns (other columns are `Null`).
    Key(TupleData),
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Full(TupleData),
}

impl OldTuple {
    /// The values, whichever the kind.
    pub fn tuple(&self) -> &TupleData {
        match self {
            Self::Key(t) | Self::Full(t) => t,
        }
    }
}

/// Why a message could not be decoded. Every variant names the message kind and, where it applies,
/// the field at fault. A decode error means the stream is not what pgoutput sends (a bug here, a
/// corrupted connection or an unsupported protocol option): the caller should stop, not skip.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input has no byte at all.
    #[error("empty pgoutput message")]
    Empty,
    /// The input ends in the middle of a field.
    #[error(
        "pgoutput {message} message ends early: {field} needs {needed} byte(s), {remaining} left"
    )]
    UnexpectedEnd {
        message: &'static str,
        field: &'static str,
        needed: usize,
        remaining: usize,
    },
    /// The first byte is no message tag this decoder knows.
    #[error("unknown pgoutput message tag {}", ShowByte(*tag))]
    UnknownTag { tag: u8 },
    /// A message that the negotiated protocol version cannot send.
    #[error("pgoutput {message} message is not part of protocol version {proto_version}")]
    NotInProtocolVersion {
        message: &'static str,
        proto_version: u32,
    },
    /// A tuple value has an unknown kind byte.
    #[error("pgoutput {message} message: column {column} has unknown value kind {}", ShowByte(*kind))]
    UnknownTupleKind {
        message: &'static str,
        column: usize,
        kind: u8,
    },
    /// An Update or Delete has an unexpected byte where a tuple marker (`K`, `O`, `N`) belongs.
    #[error("pgoutput {message} message: expected {expected} but found {}", ShowByte(*found))]
    UnexpectedTupleMarker {
        message: &'static str,
        expected: &'static str,
        found: u8,
    },
    /// A string has no terminating NUL byte.
    #[error("pgoutput {message} message: {field} is not NUL-terminated")]
    UnterminatedString {
        message: &'static str,
        field: &'static str,
    },
    /// A string is not valid UTF-8.
    #[error("pgoutput {message} message: {field} is not valid UTF-8")]
    InvalidUtf8 {
        message: &'static str,
        field: &'static str,
        #[source]
        source: Utf8Error,
    },
    /// Bytes are left after the last field of the message.
    #[error("pgoutput {message} message has {remaining} unexpected trailing byte(s)")]
    TrailingBytes {
        message: &'static str,
        remaining: usize,
    },
    /// A Stream Start while a stream block is open.
    #[error("pgoutput Stream Start for xid {xid} inside the open stream block of xid {open_xid}")]
    NestedStreamStart { xid: u32, open_xid: u32 },
    /// A Stream Stop without an open stream block.
    #[error("pgoutput Stream Stop outside a stream block")]
    StreamStopOutsideBlock,
    /// A message that cannot occur inside a stream block (Begin, Commit, Stream Commit, Stream Abort).
    #[error("pgoutput {message} message inside the stream block of xid {open_xid}")]
    InsideStreamBlock {
        message: &'static str,
        open_xid: u32,
    },
    /// A tuple does not have one value per column of its relation (see [`Relation::check_tuple`]).
    #[error(
        "relation {relation_oid}: tuple has {found} value(s) but the relation has {expected} column(s)"
    )]
    ColumnCountMismatch {
        relation_oid: u32,
        expected: usize,
        found: usize,
    },
}

/// Shows a tag byte as `'B' (0x42)`, or as `0x01` when not printable.
struct ShowByte(u8);

impl fmt::Display for ShowByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}' ({:#04x})", char::from(self.0), self.0)
        } else {
            write!(f, "{:#04x}", self.0)
        }
    }
}

/// Decodes the messages of one replication connection, in order.
///
/// The only state is whether a protocol-v2 stream block is open, which decides whether changes carry an
/// xid. Errors leave the state unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoder {
    proto_version: u32,
    open_stream: Option<u32>,
}

impl Decoder {
    /// A decoder for the `proto_version` given in `START_REPLICATION` (1, or 2 for streaming).
    pub fn new(proto_version: u32) -> Self {
        Self {
            proto_version,
            open_stream: None,
        }
    }

    /// The protocol version this decoder was made for.
    pub fn proto_version(&self) -> u32 {
        self.proto_version
    }

    /// The xid of the open stream block, if any.
    pub fn open_stream(&self) -> Option<u32> {
        self.open_stream
    }

    /// Decodes one message. Never panics; values are slices of `input`.
    pub fn decode(&mut self, input: Bytes) -> Result<LogicalMessage, DecodeError> {
        let Some(&tag) = input.first() else {
            return Err(DecodeError::Empty);
        };
        let message = tag_name(tag).ok_or(DecodeError::UnknownTag { tag })?;
        let mut r = Reader {
            buf: input,
            message,
        };
        r.buf.advance(1);

        let streaming_tag = matches!(tag, b'S' | b'E' | b'c' | b'A');
        if streaming_tag && self.proto_version < 2 {
            return Err(DecodeError::NotInProtocolVersion {
                message,
                proto_version: self.proto_version,
            });
        }
        if let Some(open_xid) = self.open_stream
            && matches!(tag, b'B' | b'C' | b'c' | b'A')
        {
            return Err(DecodeError::InsideStreamBlock { message, open_xid });
        }
        // Inside a stream block the transactional messages start with the xid (protocol v2).
        let xid = |r: &mut Reader| -> Result<Option<u32>, DecodeError> {
            match self.open_stream {
                Some(_) => r.u32("xid").map(Some),
                None => Ok(None),
            }
        };

        let decoded = match tag {
            b'B' => LogicalMessage::Begin(Begin {
                final_lsn: r.u64("final LSN")?,
                commit_time_us: pg_time_to_unix_us(r.i64("commit timestamp")?),
                xid: r.u32("xid")?,
            }),
            b'C' => LogicalMessage::Commit(Commit {
                flags: r.u8("flags")?,
                commit_lsn: r.u64("commit LSN")?,
                end_lsn: r.u64("end LSN")?,
                commit_time_us: pg_time_to_unix_us(r.i64("commit timestamp")?),
            }),
            b'O' => LogicalMessage::Origin(Origin {
                commit_lsn: r.u64("origin commit LSN")?,
                name: r.string("origin name")?,
            }),
            b'R' => {
                let xid = xid(&mut r)?;
                let oid = r.u32("relation OID")?;
                let namespace = r.string("namespace")?;
                let name = r.string("relation name")?;
                let replica_identity = r.u8("replica identity")?;
                let count = usize::from(r.u16("column count")?);
                // A column takes at least 10 bytes: never reserve more than the input can hold.
                let mut columns = Vec::with_capacity(count.min(r.buf.len() / 10));
                for _ in 0..count {
                    columns.push(RelationColumn {
                        key: r.u8("column flags")? & 1 == 1,
                        name: r.string("column name")?,
                        type_oid: r.u32("column type OID")?,
                        type_modifier: r.i32("column type modifier")?,
                    });
                }
                LogicalMessage::Relation(Relation {
                    xid,
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }
            b'Y' => LogicalMessage::Type(TypeMsg {
                xid: xid(&mut r)?,
                oid: r.u32("type OID")?,
                namespace: r.string("namespace")?,
                name: r.string("type name")?,
            }),
            b'I' => {
                let xid = xid(&mut r)?;
                let relation_oid = r.u32("relation OID")?;
                r.marker(b'N', "new tuple marker 'N'")?;
                LogicalMessage::Insert(Insert {
                    xid,
                    relation_oid,
                    new: r.tuple()?,
                })
            }
            b'U' => {
                let xid = xid(&mut r)?;
                let relation_oid = r.u32("relation OID")?;
                let (old, marker) = match r.u8("tuple marker")? {
                    b'K' => (Some(OldTuple::Key(r.tuple()?)), r.u8("new tuple marker")?),
                    b'O' => (Some(OldTuple::Full(r.tuple()?)), r.u8("new tuple marker")?),
                    other => (None, other),
                };
                if marker != b'N' {
                    return Err(DecodeError::UnexpectedTupleMarker {
                        message,
                        expected: if old.is_some() {
                            "new tuple marker 'N'"
                        } else {
                            "tuple marker 'K', 'O' or 'N'"
                        },
                        found: marker,
                    });
                }
                LogicalMessage::Update(Update {
                    xid,
                    relation_oid,
                    old,
                    new: r.tuple()?,
                })
            }
            b'D' => {
                let xid = xid(&mut r)?;
                let relation_oid = r.u32("relation OID")?;
                let old = match r.u8("old tuple marker")? {
                    b'K' => OldTuple::Key(r.tuple()?),
                    b'O' => OldTuple::Full(r.tuple()?),
                    found => {
                        return Err(DecodeError::UnexpectedTupleMarker {
                            message,
                            expected: "old tuple marker 'K' or 'O'",
                            found,
                        });
                    }
                };
                LogicalMessage::Delete(Delete {
                    xid,
                    relation_oid,
                    old,
                })
            }
            b'T' => {
                let xid = xid(&mut r)?;
                let count = r.u32("relation count")?;
                let options = r.u8("options")?;
                let count = usize::try_from(count).unwrap_or(usize::MAX);
                let mut relation_oids = Vec::with_capacity(count.min(r.buf.len() / 4));
                for _ in 0..count {
                    relation_oids.push(r.u32("relation OID")?);
                }
                LogicalMessage::Truncate(Truncate {
                    xid,
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                    relation_oids,
                })
            }
            b'M' => {
                let xid = xid(&mut r)?;
                let flags = r.u8("flags")?;
                let lsn = r.u64("message LSN")?;
                let prefix = r.string("prefix")?;
                let len = r.u32("content length")?;
                LogicalMessage::Message(LogicalDecodingMessage {
                    xid,
                    transactional: flags & 1 != 0,
                    lsn,
                    prefix,
                    content: r.bytes(len, "content")?,
                })
            }
            b'S' => {
                let start = StreamStart {
                    xid: r.u32("xid")?,
                    first_segment: r.u8("first segment flag")? == 1,
                };
                if let Some(open_xid) = self.open_stream {
                    return Err(DecodeError::NestedStreamStart {
                        xid: start.xid,
                        open_xid,
                    });
                }
                LogicalMessage::StreamStart(start)
            }
            b'E' => {
                if self.open_stream.is_none() {
                    return Err(DecodeError::StreamStopOutsideBlock);
                }
                LogicalMessage::StreamStop
            }
            b'c' => LogicalMessage::StreamCommit(StreamCommit {
                xid: r.u32("xid")?,
                flags: r.u8("flags")?,
                commit_lsn: r.u64("commit LSN")?,
                end_lsn: r.u64("end LSN")?,
                commit_time_us: pg_time_to_unix_us(r.i64("commit timestamp")?),
            }),
            b'A' => {
                let xid = r.u32("xid")?;
                let subxid = r.u32("subtransaction xid")?;
                // Protocol v4 with `streaming 'parallel'` appends the abort LSN and time; which one
                // applies is a subscription option, so the length decides.
                let (abort_lsn, abort_time_us) = if r.buf.is_empty() {
                    (None, None)
                } else {
                    let lsn = r.u64("abort LSN")?;
                    let time = pg_time_to_unix_us(r.i64("abort timestamp")?);
                    (Some(lsn), Some(time))
                };
                LogicalMessage::StreamAbort(StreamAbort {
                    xid,
                    subxid,
                    abort_lsn,
                    abort_time_us,
                })
            }
            _ => return Err(DecodeError::UnknownTag { tag }),
        };
        r.finish()?;

        match &decoded {
            LogicalMessage::StreamStart(start) => self.open_stream = Some(start.xid),
            LogicalMessage::StreamStop => self.open_stream = None,
            _ => {}
        }
        Ok(decoded)
    }
}

/// Name of the message a tag introduces, `None` for unknown tags.
fn tag_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        _ => return None,
    })
}

/// Checked big-endian reads over the rest of one message.
struct Reader {
    buf: Bytes,
    message: &'static str,
}

impl Reader {
    fn end(&self, field: &'static str, needed: usize) -> DecodeError {
        DecodeError::UnexpectedEnd {
            message: self.message,
            field,
            needed,
            remaining: self.buf.len(),
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let array: [u8; N] = self
            .buf
            .get(..N)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| self.end(field, N))?;
        // In range: `get(..N)` succeeded.
        self.buf.advance(N);
        Ok(array)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_be_bytes)
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    /// `len` bytes as a slice of the input (no copy).
    fn bytes(&mut self, len: u32, field: &'static str) -> Result<Bytes, DecodeError> {
        match usize::try_from(len) {
            Ok(len) if len <= self.buf.len() => Ok(self.buf.split_to(len)),
            _ => Err(self.end(field, usize::try_from(len).unwrap_or(usize::MAX))),
        }
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let Some(nul) = self.buf.iter().position(|&b| b == 0) else {
            return Err(DecodeError::UnterminatedString {
                message: self.message,
                field,
            });
        };
        // `nul < len`: both the split and the advance over the NUL are in range.
        let raw = self.buf.split_to(nul);
        self.buf.advance(1);
        match std::str::from_utf8(&raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(source) => Err(DecodeError::InvalidUtf8 {
                message: self.message,
                field,
                source,
            }),
        }
    }

    /// A fixed marker byte.
    fn marker(&mut self, expected: u8, name: &'static str) -> Result<(), DecodeError> {
        let found = self.u8(name)?;
        if found == expected {
            Ok(())
        } else {
            Err(DecodeError::UnexpectedTupleMarker {
                message: self.message,
                expected: name,
                found,
            })
        }
    }

    /// TupleData: Int16 column count, then per column a kind byte and, for `t` and `b`, an Int32
    /// length and that many bytes.
    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let count = usize::from(self.u16("tuple column count")?);
        // Every value takes at least one byte.
        let mut values = Vec::with_capacity(count.min(self.buf.len()));
        for column in 0..count {
            let value = match self.u8("tuple value kind")? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' => {
                    let len = self.u32("text value length")?;
                    TupleValue::Text(self.bytes(len, "text value")?)
                }
                b'b' => {
                    let len = self.u32("binary value length")?;
                    TupleValue::Binary(self.bytes(len, "binary value")?)
                }
                kind => {
                    return Err(DecodeError::UnknownTupleKind {
                        message: self.message,
                        column,
                        kind,
                    });
                }
            };
            values.push(value);
        }
        Ok(values)
    }

    /// The message must be consumed exactly.
    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                message: self.message,
                remaining: self.buf.len(),
            })
        }
    }
}
