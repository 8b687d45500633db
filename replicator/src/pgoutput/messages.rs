//! The decoded pgoutput messages, one struct per message kind, and the
//! epoch conversion of their timestamps. Plain data: decoding is in
//! [`super::Decoder`].

use bytes::Bytes;

use crate::replication::PG_EPOCH_UNIX_MICROS;

/// Converts a Postgres `TimestampTz` (microseconds since 2000-01-01 UTC) to microseconds since the UNIX
/// epoch, saturating instead of overflowing.
pub fn pg_time_to_unix_us(pg_time_us: i64) -> i64 {
    pg_time_us.saturating_add(PG_EPOCH_UNIX_MICROS)
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
