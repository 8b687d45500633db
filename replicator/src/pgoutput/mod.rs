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
//! messages (`tests/fixtures/pgoutput/`) and every prefix of them, and the cargo-fuzz target
//! `pgoutput` in `fuzz/` explores further (`scripts/fuzz` runs it, on stable Rust).
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
//! - **Column counts**: tuples are checked against nothing here (the decoder keeps no relation cache).
//! - Two-phase messages (protocol v3, `two_phase 'on'`) are not supported: their tags are unknown here.

use std::fmt;
use std::str::Utf8Error;

use bytes::{Buf, Bytes};

mod messages;
mod reader;

pub use messages::*;
use reader::{Reader, tag_name};

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

    /// A protocol-v2 decoder inside the stream block of `xid`: for messages of
    /// a streamed transaction read back after they were received (their xid
    /// field is present).
    pub fn in_stream_block(xid: u32) -> Self {
        Self {
            proto_version: 2,
            open_stream: Some(xid),
        }
    }

    /// The xid of the open stream block, if one is open.
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
#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const V1: &str = include_str!("../../tests/fixtures/pgoutput/v1.hex");
    const V2_STREAMING: &str = include_str!("../../tests/fixtures/pgoutput/v2_streaming.hex");

    /// One message per non-empty line, hex-encoded.
    fn fixture(text: &str) -> Vec<Bytes> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let bytes: Vec<u8> = (0..l.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&l[i..i + 2], 16).expect("hex fixture"))
                    .collect();
                Bytes::from(bytes)
            })
            .collect()
    }

    fn decode_all(proto_version: u32, text: &str) -> Vec<LogicalMessage> {
        let mut decoder = Decoder::new(proto_version);
        fixture(text)
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                decoder
                    .decode(m)
                    .unwrap_or_else(|e| panic!("message {i}: {e}"))
            })
            .collect()
    }

    fn tags(messages: &[LogicalMessage]) -> String {
        messages
            .iter()
            .map(|m| match m {
                LogicalMessage::Begin(_) => 'B',
                LogicalMessage::Commit(_) => 'C',
                LogicalMessage::Origin(_) => 'O',
                LogicalMessage::Relation(_) => 'R',
                LogicalMessage::Type(_) => 'Y',
                LogicalMessage::Insert(_) => 'I',
                LogicalMessage::Update(_) => 'U',
                LogicalMessage::Delete(_) => 'D',
                LogicalMessage::Truncate(_) => 'T',
                LogicalMessage::Message(_) => 'M',
                LogicalMessage::StreamStart(_) => 'S',
                LogicalMessage::StreamStop => 'E',
                LogicalMessage::StreamCommit(_) => 'c',
                LogicalMessage::StreamAbort(_) => 'A',
            })
            .collect()
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// Builds messages by hand.
    #[derive(Default)]
    struct Msg(Vec<u8>);

    impl Msg {
        fn new(tag: u8) -> Self {
            Self(vec![tag])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn raw(mut self, v: &[u8]) -> Self {
            self.0.extend_from_slice(v);
            self
        }
        fn str(self, s: &str) -> Self {
            self.raw(s.as_bytes()).u8(0)
        }
        fn text(self, s: &str) -> Self {
            let len = u32::try_from(s.len()).expect("short");
            self.u8(b't').u32(len).raw(s.as_bytes())
        }
        fn bytes(&self) -> Bytes {
            Bytes::copy_from_slice(&self.0)
        }
    }

    fn v1(m: &Msg) -> Result<LogicalMessage, DecodeError> {
        Decoder::new(1).decode(m.bytes())
    }

    /// 2024-01-02 03:04:05 UTC in Postgres-epoch and UNIX-epoch microseconds.
    const PG_TIME: i64 = 757_479_845_000_000;
    const UNIX_TIME: i64 = 1_704_164_645_000_000;

    #[test]
    fn pgoutput_time_conversion() {
        assert_eq!(pg_time_to_unix_us(PG_TIME), UNIX_TIME);
        assert_eq!(
            pg_time_to_unix_us(0),
            crate::replication::PG_EPOCH_UNIX_MICROS
        );
        assert_eq!(pg_time_to_unix_us(i64::MAX), i64::MAX);
        assert_eq!(
            pg_time_to_unix_us(i64::MIN),
            i64::MIN + crate::replication::PG_EPOCH_UNIX_MICROS
        );
    }

    #[test]
    fn pgoutput_begin_commit_origin() {
        let begin = Msg::new(b'B').u64(0x1_0000_0010).i64(PG_TIME).u32(742);
        assert_eq!(
            v1(&begin).unwrap(),
            LogicalMessage::Begin(Begin {
                final_lsn: 0x1_0000_0010,
                commit_time_us: UNIX_TIME,
                xid: 742
            })
        );
        let commit = Msg::new(b'C').u8(0).u64(10).u64(20).i64(PG_TIME);
        assert_eq!(
            v1(&commit).unwrap(),
            LogicalMessage::Commit(Commit {
                flags: 0,
                commit_lsn: 10,
                end_lsn: 20,
                commit_time_us: UNIX_TIME
            })
        );
        let origin = Msg::new(b'O').u64(99).str("upstream");
        assert_eq!(
            v1(&origin).unwrap(),
            LogicalMessage::Origin(Origin {
                commit_lsn: 99,
                name: "upstream".into()
            })
        );
    }

    #[test]
    fn pgoutput_relation_and_type() {
        let rel = Msg::new(b'R')
            .u32(16384)
            .str("public")
            .str("t")
            .u8(b'd')
            .u16(2)
            .u8(1)
            .str("id")
            .u32(20)
            .i32(-1)
            .u8(0)
            .str("v")
            .u32(1043)
            .i32(24);
        let LogicalMessage::Relation(r) = v1(&rel).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(r.xid, None);
        assert_eq!(
            (r.oid, r.namespace.as_str(), r.name.as_str()),
            (16384, "public", "t")
        );
        assert_eq!(r.replica_identity, b'd');
        assert_eq!(
            r.columns,
            vec![
                RelationColumn {
                    key: true,
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1
                },
                RelationColumn {
                    key: false,
                    name: "v".into(),
                    type_oid: 1043,
                    type_modifier: 24
                },
            ]
        );

        let ty = Msg::new(b'Y').u32(70000).str("public").str("mood");
        assert_eq!(
            v1(&ty).unwrap(),
            LogicalMessage::Type(TypeMsg {
                xid: None,
                oid: 70000,
                namespace: "public".into(),
                name: "mood".into()
            })
        );
    }

    #[test]
    fn pgoutput_insert_with_every_value_kind() {
        let ins = Msg::new(b'I')
            .u32(7)
            .u8(b'N')
            .u16(4)
            .u8(b'n')
            .u8(b'u')
            .text("héllo")
            .u8(b'b')
            .u32(2)
            .raw(&[0, 255]);
        let input = ins.bytes();
        let decoded = Decoder::new(1).decode(input.clone()).unwrap();
        let LogicalMessage::Insert(insert) = &decoded else {
            panic!("not an insert")
        };
        assert_eq!(insert.relation_oid, 7);
        assert_eq!(
            insert.new,
            vec![
                TupleValue::Null,
                TupleValue::UnchangedToast,
                text("héllo"),
                TupleValue::Binary(Bytes::from_static(&[0, 255]))
            ]
        );
        // Values are slices of the input, not copies.
        let TupleValue::Text(v) = &insert.new[2] else {
            panic!()
        };
        let offset = v.as_ptr() as usize - input.as_ptr() as usize;
        assert!(offset < input.len());
    }

    #[test]
    fn pgoutput_update_delete_old_tuple_kinds() {
        let plain = Msg::new(b'U').u32(7).u8(b'N').u16(1).text("a");
        assert_eq!(
            v1(&plain).unwrap(),
            LogicalMessage::Update(Update {
                xid: None,
                relation_oid: 7,
                old: None,
                new: vec![text("a")]
            })
        );
        let key = Msg::new(b'U')
            .u32(7)
            .u8(b'K')
            .u16(2)
            .text("1")
            .u8(b'n')
            .u8(b'N')
            .u16(2)
            .text("2")
            .text("b");
        assert_eq!(
            v1(&key).unwrap(),
            LogicalMessage::Update(Update {
                xid: None,
                relation_oid: 7,
                old: Some(OldTuple::Key(vec![text("1"), TupleValue::Null])),
                new: vec![text("2"), text("b")]
            })
        );
        let full = Msg::new(b'U')
            .u32(7)
            .u8(b'O')
            .u16(1)
            .text("x")
            .u8(b'N')
            .u16(1)
            .text("y");
        let LogicalMessage::Update(u) = v1(&full).unwrap() else {
            panic!()
        };
        assert_eq!(u.old, Some(OldTuple::Full(vec![text("x")])));

        let del_key = Msg::new(b'D').u32(7).u8(b'K').u16(1).text("1");
        assert_eq!(
            v1(&del_key).unwrap(),
            LogicalMessage::Delete(Delete {
                xid: None,
                relation_oid: 7,
                old: OldTuple::Key(vec![text("1")])
            })
        );
        let del_full = Msg::new(b'D').u32(7).u8(b'O').u16(1).text("1");
        let LogicalMessage::Delete(d) = v1(&del_full).unwrap() else {
            panic!()
        };
        assert_eq!(d.old, OldTuple::Full(vec![text("1")]));
        assert_eq!(d.old.tuple(), &vec![text("1")]);

        // A delete always has an old tuple; an update always ends with a new one.
        let del_new = Msg::new(b'D').u32(7).u8(b'N').u16(0);
        assert!(matches!(
            v1(&del_new),
            Err(DecodeError::UnexpectedTupleMarker { found: b'N', .. })
        ));
        let upd_two_old = Msg::new(b'U').u32(7).u8(b'K').u16(0).u8(b'K').u16(0);
        assert!(matches!(
            v1(&upd_two_old),
            Err(DecodeError::UnexpectedTupleMarker { found: b'K', .. })
        ));
    }

    #[test]
    fn pgoutput_truncate_and_message() {
        let t = Msg::new(b'T').u32(2).u8(3).u32(10).u32(11);
        assert_eq!(
            v1(&t).unwrap(),
            LogicalMessage::Truncate(Truncate {
                xid: None,
                cascade: true,
                restart_identity: true,
                relation_oids: vec![10, 11]
            })
        );
        let t = Msg::new(b'T').u32(1).u8(0).u32(10);
        let LogicalMessage::Truncate(t) = v1(&t).unwrap() else {
            panic!()
        };
        assert!(!t.cascade && !t.restart_identity);

        let m = Msg::new(b'M')
            .u8(1)
            .u64(500)
            .str("sluice")
            .u32(3)
            .raw(b"abc");
        assert_eq!(
            v1(&m).unwrap(),
            LogicalMessage::Message(LogicalDecodingMessage {
                xid: None,
                transactional: true,
                lsn: 500,
                prefix: "sluice".into(),
                content: Bytes::from_static(b"abc")
            })
        );
    }

    #[test]
    fn pgoutput_stream_block_state() {
        let mut d = Decoder::new(2);
        let start = Msg::new(b'S').u32(900).u8(1);
        assert_eq!(
            d.decode(start.bytes()).unwrap(),
            LogicalMessage::StreamStart(StreamStart {
                xid: 900,
                first_segment: true
            })
        );
        assert_eq!(d.open_stream, Some(900));
        // Inside the block changes carry the (sub)transaction xid first.
        let ins = Msg::new(b'I').u32(901).u32(7).u8(b'N').u16(1).text("1");
        let LogicalMessage::Insert(i) = d.decode(ins.bytes()).unwrap() else {
            panic!()
        };
        assert_eq!((i.xid, i.relation_oid), (Some(901), 7));
        let rel = Msg::new(b'R')
            .u32(900)
            .u32(7)
            .str("s")
            .str("t")
            .u8(b'f')
            .u16(0);
        let LogicalMessage::Relation(r) = d.decode(rel.bytes()).unwrap() else {
            panic!()
        };
        assert_eq!((r.xid, r.oid, r.replica_identity), (Some(900), 7, b'f'));
        let typ = Msg::new(b'Y').u32(900).u32(8).str("s").str("ty");
        assert!(matches!(
            d.decode(typ.bytes()),
            Ok(LogicalMessage::Type(TypeMsg { xid: Some(900), .. }))
        ));
        let upd = Msg::new(b'U').u32(900).u32(7).u8(b'N').u16(0);
        assert!(matches!(
            d.decode(upd.bytes()),
            Ok(LogicalMessage::Update(Update { xid: Some(900), .. }))
        ));
        let del = Msg::new(b'D').u32(900).u32(7).u8(b'K').u16(0);
        assert!(matches!(
            d.decode(del.bytes()),
            Ok(LogicalMessage::Delete(Delete { xid: Some(900), .. }))
        ));
        let tr = Msg::new(b'T').u32(900).u32(1).u8(0).u32(7);
        assert!(matches!(
            d.decode(tr.bytes()),
            Ok(LogicalMessage::Truncate(Truncate { xid: Some(900), .. }))
        ));
        let msg = Msg::new(b'M').u32(900).u8(1).u64(1).str("p").u32(0);
        assert!(matches!(
            d.decode(msg.bytes()),
            Ok(LogicalMessage::Message(LogicalDecodingMessage {
                xid: Some(900),
                ..
            }))
        ));
        // No nested blocks, no Begin/Commit inside one; errors leave the state alone.
        assert_eq!(
            d.decode(start.bytes()),
            Err(DecodeError::NestedStreamStart {
                xid: 900,
                open_xid: 900
            })
        );
        let begin = Msg::new(b'B').u64(1).i64(0).u32(1);
        assert!(matches!(
            d.decode(begin.bytes()),
            Err(DecodeError::InsideStreamBlock { open_xid: 900, .. })
        ));
        assert_eq!(d.open_stream, Some(900));

        assert_eq!(
            d.decode(Msg::new(b'E').bytes()).unwrap(),
            LogicalMessage::StreamStop
        );
        assert_eq!(d.open_stream, None);
        assert_eq!(
            d.decode(Msg::new(b'E').bytes()),
            Err(DecodeError::StreamStopOutsideBlock)
        );
        // Outside the block the same insert bytes would be mis-framed: no xid is expected.
        let plain = Msg::new(b'I').u32(7).u8(b'N').u16(0);
        assert!(matches!(
            d.decode(plain.bytes()),
            Ok(LogicalMessage::Insert(Insert { xid: None, .. }))
        ));

        let commit = Msg::new(b'c').u32(900).u8(0).u64(30).u64(40).i64(PG_TIME);
        assert_eq!(
            d.decode(commit.bytes()).unwrap(),
            LogicalMessage::StreamCommit(StreamCommit {
                xid: 900,
                flags: 0,
                commit_lsn: 30,
                end_lsn: 40,
                commit_time_us: UNIX_TIME
            })
        );
        let abort = Msg::new(b'A').u32(900).u32(905);
        assert_eq!(
            d.decode(abort.bytes()).unwrap(),
            LogicalMessage::StreamAbort(StreamAbort {
                xid: 900,
                subxid: 905,
                abort_lsn: None,
                abort_time_us: None
            })
        );
        let abort_v4 = Msg::new(b'A').u32(900).u32(900).u64(77).i64(PG_TIME);
        assert_eq!(
            d.decode(abort_v4.bytes()).unwrap(),
            LogicalMessage::StreamAbort(StreamAbort {
                xid: 900,
                subxid: 900,
                abort_lsn: Some(77),
                abort_time_us: Some(UNIX_TIME)
            })
        );
        // Protocol v1 has no streaming.
        assert_eq!(
            Decoder::new(1).decode(start.bytes()),
            Err(DecodeError::NotInProtocolVersion {
                message: "Stream Start",
                proto_version: 1
            })
        );
    }

    #[test]
    fn pgoutput_errors_name_the_fault() {
        let mut d = Decoder::new(1);
        assert_eq!(d.decode(Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            d.decode(Bytes::from_static(b"Z")),
            Err(DecodeError::UnknownTag { tag: b'Z' })
        );
        assert_eq!(
            DecodeError::UnknownTag { tag: b'Z' }.to_string(),
            "unknown pgoutput message tag 'Z' (0x5a)"
        );
        let short = Msg::new(b'B').u64(1).u16(0);
        let err = v1(&short).unwrap_err();
        assert_eq!(
            err,
            DecodeError::UnexpectedEnd {
                message: "Begin",
                field: "commit timestamp",
                needed: 8,
                remaining: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "pgoutput Begin message ends early: commit timestamp needs 8 byte(s), 2 left"
        );
        let kind = Msg::new(b'I').u32(7).u8(b'N').u16(2).u8(b'n').u8(b'x');
        assert_eq!(
            v1(&kind),
            Err(DecodeError::UnknownTupleKind {
                message: "Insert",
                column: 1,
                kind: b'x'
            })
        );
        let utf8 = Msg::new(b'O').u64(1).raw(&[0xff, 0xfe, 0]);
        assert!(matches!(
            v1(&utf8),
            Err(DecodeError::InvalidUtf8 {
                message: "Origin",
                field: "origin name",
                ..
            })
        ));
        let unterminated = Msg::new(b'O').u64(1).raw(b"abc");
        assert_eq!(
            v1(&unterminated),
            Err(DecodeError::UnterminatedString {
                message: "Origin",
                field: "origin name"
            })
        );
        let trailing = Msg::new(b'O').u64(1).str("a").u8(0);
        assert_eq!(
            v1(&trailing),
            Err(DecodeError::TrailingBytes {
                message: "Origin",
                remaining: 1
            })
        );
        let long_value = Msg::new(b'I').u32(7).u8(b'N').u16(1).u8(b't').u32(u32::MAX);
        assert!(matches!(
            v1(&long_value),
            Err(DecodeError::UnexpectedEnd {
                field: "text value",
                ..
            })
        ));
        // Huge announced counts fail on the missing bytes, they do not allocate.
        let many = Msg::new(b'T').u32(u32::MAX).u8(0).u32(1);
        assert!(matches!(
            v1(&many),
            Err(DecodeError::UnexpectedEnd {
                field: "relation OID",
                ..
            })
        ));
    }

    /// The real messages of `tests/fixtures/pgoutput/v1.hex` (see the README there).
    #[test]
    fn pgoutput_fixture_v1() {
        let msgs = decode_all(1, V1);
        assert_eq!(
            tags(&msgs),
            "BRICBICBUCBUCBDCBRIICBUCBUCBDCBUMCMBRTCBRRTCBRICBUCBRIIIMUDC"
        );

        // Every transaction: Begin's final LSN is its Commit's commit LSN, times are plausible.
        let mut begin = None;
        let mut relations: HashMap<u32, Relation> = HashMap::new();
        for m in &msgs {
            match m {
                LogicalMessage::Begin(b) => begin = Some(b.clone()),
                LogicalMessage::Commit(c) => {
                    let b = begin.take().expect("commit after begin");
                    assert_eq!(b.final_lsn, c.commit_lsn);
                    assert_eq!(b.commit_time_us, c.commit_time_us);
                    assert!(c.end_lsn > c.commit_lsn);
                    // Captured in 2020 or later, before 2100.
                    assert!(
                        (1_577_836_800_000_000..4_102_444_800_000_000).contains(&c.commit_time_us)
                    );
                }
                LogicalMessage::Relation(r) => {
                    relations.insert(r.oid, r.clone());
                }
                // One value per column of the relation (old key tuples too:
                // pgoutput sends the non-key columns of a key tuple as nulls).
                LogicalMessage::Insert(i) => {
                    assert_eq!(i.new.len(), relations[&i.relation_oid].columns.len());
                }
                LogicalMessage::Update(u) => {
                    let columns = relations[&u.relation_oid].columns.len();
                    assert_eq!(u.new.len(), columns);
                    if let Some(old) = &u.old {
                        assert_eq!(old.tuple().len(), columns);
                    }
                }
                LogicalMessage::Delete(d) => {
                    assert_eq!(
                        d.old.tuple().len(),
                        relations[&d.relation_oid].columns.len()
                    );
                }
                _ => {}
            }
            if let LogicalMessage::Insert(Insert { xid, .. }) = m {
                assert_eq!(*xid, None);
            }
        }

        // items, REPLICA IDENTITY DEFAULT (primary key id).
        let LogicalMessage::Relation(items) = &msgs[1] else {
            panic!()
        };
        assert_eq!(
            (items.namespace.as_str(), items.name.as_str()),
            ("public", "items")
        );
        assert_eq!(items.replica_identity, b'd');
        let names: Vec<&str> = items.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "id", "name", "price", "tags", "meta", "created", "flag", "payload", "note"
            ]
        );
        let keys: Vec<bool> = items.columns.iter().map(|c| c.key).collect();
        assert_eq!(
            keys,
            [true, false, false, false, false, false, false, false, false]
        );
        let types: Vec<u32> = items.columns.iter().map(|c| c.type_oid).collect();
        // int8, text, numeric, text[], jsonb, timestamptz, bool, bytea, varchar
        assert_eq!(types, [20, 25, 1700, 1009, 3802, 1184, 16, 17, 1043]);
        let typmods: Vec<i32> = items.columns.iter().map(|c| c.type_modifier).collect();
        // numeric(10,2) = ((10 << 16) | 2) + 4, varchar(20) = 20 + 4
        assert_eq!(typmods, [-1, -1, 655_366, -1, -1, -1, -1, -1, 24]);

        let LogicalMessage::Insert(first) = &msgs[2] else {
            panic!()
        };
        assert_eq!(first.relation_oid, items.oid);
        assert_eq!(
            first.new,
            vec![
                text("1"),
                text("héllo"),
                text("12.50"),
                text("{a,b}"),
                text(r#"{"k": 1}"#),
                text("2024-01-02 03:04:05.123456+00"),
                text("t"),
                text("\\x00ff"),
                text("short"),
            ]
        );
        let LogicalMessage::Insert(second) = &msgs[5] else {
            panic!()
        };
        assert_eq!(second.new[..2], [text("2"), text("nulls")]);
        assert!(second.new[2..].iter().all(|v| *v == TupleValue::Null));

        // Non-key update: no old tuple. Key change: old key tuple, non-key columns null.
        let LogicalMessage::Update(price) = &msgs[8] else {
            panic!()
        };
        assert_eq!((price.old.as_ref(), &price.new[2]), (None, &text("13.75")));
        let LogicalMessage::Update(rekey) = &msgs[11] else {
            panic!()
        };
        let Some(OldTuple::Key(old)) = &rekey.old else {
            panic!("expected key tuple, got {:?}", rekey.old)
        };
        assert_eq!(old[0], text("2"));
        assert!(old[1..].iter().all(|v| *v == TupleValue::Null));
        assert_eq!(rekey.new[..2], [text("10"), text("nulls")]);
        let LogicalMessage::Delete(del) = &msgs[14] else {
            panic!()
        };
        assert!(matches!(&del.old, OldTuple::Key(t) if t[0] == text("10")));

        // fullrow, REPLICA IDENTITY FULL: old tuples are whole rows.
        let LogicalMessage::Relation(fullrow) = &msgs[17] else {
            panic!()
        };
        assert_eq!(
            (fullrow.name.as_str(), fullrow.replica_identity),
            ("fullrow", b'f')
        );
        let LogicalMessage::Insert(null_v) = &msgs[19] else {
            panic!()
        };
        assert_eq!(null_v.new, [text("2"), TupleValue::Null]);
        let LogicalMessage::Update(u) = &msgs[22] else {
            panic!()
        };
        assert_eq!(u.old, Some(OldTuple::Full(vec![text("1"), text("one")])));
        assert_eq!(u.new, [text("1"), text("uno")]);
        let LogicalMessage::Update(u) = &msgs[25] else {
            panic!()
        };
        assert_eq!(
            u.old,
            Some(OldTuple::Full(vec![text("2"), TupleValue::Null]))
        );
        assert_eq!(u.new, [text("20"), TupleValue::Null]);
        let LogicalMessage::Delete(d) = &msgs[28] else {
            panic!()
        };
        assert_eq!(d.old, OldTuple::Full(vec![text("1"), text("uno")]));

        // Logical decoding messages, transactional inside its transaction, the other on its own.
        let LogicalMessage::Message(tx) = &msgs[32] else {
            panic!()
        };
        assert!(tx.transactional);
        assert_eq!(
            (tx.prefix.as_str(), &tx.content[..]),
            ("sluice", &b"transactional payload"[..])
        );
        let LogicalMessage::Message(ntx) = &msgs[34] else {
            panic!()
        };
        assert!(!ntx.transactional);
        assert_eq!(
            (ntx.prefix.as_str(), &ntx.content[..]),
            ("sluice.ctl", &[1u8, 2, 0xff][..])
        );

        // TRUNCATE fullrow; TRUNCATE big, fullrow RESTART IDENTITY CASCADE.
        let LogicalMessage::Truncate(t) = &msgs[37] else {
            panic!()
        };
        assert_eq!((t.cascade, t.restart_identity), (false, false));
        assert_eq!(t.relation_oids, [fullrow.oid]);
        let LogicalMessage::Truncate(t) = &msgs[42] else {
            panic!()
        };
        assert_eq!((t.cascade, t.restart_identity), (true, true));
        assert_eq!(t.relation_oids.len(), 2);
        assert!(t.relation_oids.contains(&fullrow.oid));

        // toasty: the update leaves the TOASTed text out.
        let LogicalMessage::Insert(toast_ins) = &msgs[46] else {
            panic!()
        };
        assert!(matches!(&toast_ins.new[2], TupleValue::Text(v) if v.len() == 6400));
        let LogicalMessage::Update(toast_upd) = &msgs[49] else {
            panic!()
        };
        assert_eq!(
            toast_upd.new,
            [text("1"), text("1"), TupleValue::UnchangedToast]
        );
    }

    /// The real messages of `tests/fixtures/pgoutput/v2_streaming.hex`: the same history, but the
    /// 3000-row transaction is streamed in blocks before its commit.
    #[test]
    fn pgoutput_fixture_v2_streaming() {
        let msgs = decode_all(2, V2_STREAMING);
        let t = tags(&msgs);
        assert!(
            t.starts_with("BRICBICBUCBUCBDCBRIICBUCBUCBDCBUMCMBRTCBRRTCBRICBUC"),
            "{t}"
        );
        assert!(t.ends_with("SMUDEc"), "{t}");

        let mut open = None;
        let mut blocks = 0;
        let mut streamed_changes = 0;
        for m in &msgs {
            match m {
                LogicalMessage::StreamStart(s) => {
                    assert_eq!(s.first_segment, blocks == 0);
                    if let Some(xid) = open {
                        assert_eq!(xid, s.xid, "one streamed transaction in this fixture");
                    }
                    open = Some(s.xid);
                    blocks += 1;
                }
                LogicalMessage::StreamCommit(c) => {
                    assert_eq!(Some(c.xid), open);
                    assert!(c.end_lsn > c.commit_lsn);
                }
                LogicalMessage::Insert(Insert { xid, .. })
                | LogicalMessage::Update(Update { xid, .. })
                | LogicalMessage::Delete(Delete { xid, .. })
                | LogicalMessage::Relation(Relation { xid, .. })
                | LogicalMessage::Message(LogicalDecodingMessage { xid, .. }) => {
                    if let Some(xid) = xid {
                        assert_eq!(Some(*xid), open);
                        streamed_changes += 1;
                    }
                }
                _ => {}
            }
        }
        assert!(
            blocks > 1,
            "the big transaction is streamed in several blocks"
        );
        // Relation + 3 kept inserts + message, update, delete.
        assert_eq!(streamed_changes, 7);
        let LogicalMessage::Message(m) = &msgs[msgs.len() - 5] else {
            panic!()
        };
        assert_eq!((m.xid, &m.content[..]), (open, &b"in stream"[..]));
    }

    /// Decodes each fixture message in the decoder state it was captured in, and every strict prefix
    /// of it: prefixes are errors (a message is consumed exactly), nothing panics.
    #[test]
    fn pgoutput_fixture_prefixes_are_errors() {
        for (version, text) in [(1, V1), (2, V2_STREAMING)] {
            let mut decoder = Decoder::new(version);
            for message in fixture(text) {
                for len in 0..message.len() {
                    let result = decoder.clone().decode(message.slice(..len));
                    assert!(
                        result.is_err(),
                        "prefix {len} of {message:?} decoded: {result:?}"
                    );
                }
                decoder.decode(message).unwrap();
            }
        }
    }

    /// Fixed-seed linear congruential generator (Knuth's MMIX constants).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 33
        }
        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next()).unwrap() % n
        }
    }

    fn decoders() -> Vec<Decoder> {
        let mut in_stream = Decoder::new(2);
        in_stream
            .decode(Bytes::from_static(&[b'S', 0, 0, 3, 0x84, 1]))
            .unwrap();
        vec![Decoder::new(1), Decoder::new(2), in_stream]
    }

    #[test]
    fn pgoutput_random_bytes_never_panic() {
        const TAGS: &[u8] = b"BCORYIUDTMSEcAKNOnutb";
        let mut rng = Lcg(0x5EED);
        for _ in 0..50_000 {
            let len = rng.below(48);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Mostly plausible bytes, so decoding gets past the first checks.
            for b in bytes.iter_mut() {
                if rng.below(2) == 0 {
                    *b = TAGS[rng.below(TAGS.len())];
                } else if rng.below(2) == 0 {
                    *b = rng.below(4) as u8;
                }
            }
            let bytes = Bytes::from(bytes);
            for mut d in decoders() {
                let _ = d.decode(bytes.clone());
            }
        }
    }

    #[test]
    fn pgoutput_mutated_fixtures_never_panic() {
        let mut rng = Lcg(42);
        let messages: Vec<Bytes> = fixture(V1)
            .into_iter()
            .chain(fixture(V2_STREAMING))
            .collect();
        for _ in 0..20_000 {
            let original = &messages[rng.below(messages.len())];
            if original.len() > 1_000 {
                continue;
            }
            let mut bytes = original.to_vec();
            for _ in 0..=rng.below(3) {
                let i = rng.below(bytes.len());
                bytes[i] = match rng.below(3) {
                    0 => rng.next() as u8,
                    1 => 0,
                    _ => 0xff,
                };
            }
            let bytes = Bytes::from(bytes);
            for mut d in decoders() {
                let _ = d.decode(bytes.clone());
            }
        }
    }
}
