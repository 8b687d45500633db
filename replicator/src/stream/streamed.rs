//! Transactions Postgres streams before they commit (pgoutput protocol 2,
//! `streaming 'on'`, Postgres 14+).
//!
//! Without streaming, Postgres decodes a whole transaction, spilling it to
//! files under `pg_replslot/` once it outgrows `logical_decoding_work_mem`,
//! and sends its first byte only after its commit. With streaming it sends
//! such a transaction while it runs, in blocks (Stream Start … Stream Stop)
//! between other transactions, and ends it with Stream Commit or Stream Abort.
//!
//! The replicator must publish only committed rows, and a row's version and
//! dedup ID need the commit LSN, which only Stream Commit tells. So each
//! streamed transaction's messages are written as received to a local spill
//! file (this module), and on Stream Commit they are read back and handed to
//! the ordinary path as if the transaction had arrived whole at that moment:
//! Begin (with the commit LSN), the messages in order, Commit. Nothing of a
//! streamed transaction reaches JetStream before its commit.
//!
//! - **Aborts.** A whole transaction's abort drops its file. A
//!   subtransaction's abort (`ROLLBACK TO SAVEPOINT`) cuts the file back to the
//!   subtransaction's first message: everything after it belongs to it or to
//!   subtransactions under it, each of which Postgres reports aborted too (the
//!   rule Postgres' own apply worker follows). Relation and Type messages in
//!   the cut part are written again after the cut, because Postgres does not
//!   send a relation twice in one streamed transaction; a relation an aborted
//!   DDL changed is sent again before its next change.
//! - **Memory** holds one write buffer per open streamed transaction and the
//!   positions of its subtransactions; the rows are on disk. The files are
//!   anonymous (unlinked at creation): they disappear when the process ends,
//!   however it ends.
//! - **Crash safety.** Nothing about a streamed transaction is confirmed to
//!   Postgres before its rows are acknowledged after its commit. Postgres keeps
//!   the slot's restart LSN behind every running transaction, so after a
//!   restart it streams an open transaction again from its first change, into
//!   a new file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use metrics::{Counter, Gauge, counter, gauge};

use crate::metrics as m;
use crate::pgoutput::{self, LogicalMessage, StreamCommit};
use crate::replication::Lsn;

/// Bytes of one frame's header: the message's WAL position and its length.
const FRAME_HEADER: u64 = 8 + 4;

/// The open streamed transactions, each in its spill file.
pub(super) struct Streamed {
    dir: PathBuf,
    open: HashMap<u32, Spill>,
    spilled: Gauge,
    committed: Counter,
    aborted: Counter,
}

/// One streamed transaction's messages, framed: WAL position (8 bytes), length
/// (4 bytes), the pgoutput message as received.
struct Spill {
    file: BufWriter<File>,
    len: u64,
    /// The offset of each subtransaction's first message, in order of arrival.
    subxacts: Vec<(u32, u64)>,
    /// Relation and Type messages with their offsets (kept across a cut).
    schema: Vec<(u64, Lsn, Bytes)>,
}

impl Streamed {
    /// Spill files go to `dir`.
    pub(super) fn new(dir: PathBuf) -> Self {
        Streamed {
            dir,
            open: HashMap::new(),
            spilled: gauge!(m::STREAMED_SPILL_BYTES),
            committed: counter!(m::STREAMED_TRANSACTIONS, "outcome" => "commit"),
            aborted: counter!(m::STREAMED_TRANSACTIONS, "outcome" => "abort"),
        }
    }

    /// Stream Start of `xid`. A first segment starts the transaction afresh.
    pub(super) fn start(&mut self, xid: u32, first_segment: bool) -> Result<(), SpillError> {
        if first_segment {
            self.open.remove(&xid);
        }
        if !self.open.contains_key(&xid) {
            let file = tempfile::tempfile_in(&self.dir).map_err(|e| self.error(e))?;
            self.open.insert(
                xid,
                Spill {
                    file: BufWriter::with_capacity(256 * 1024, file),
                    len: 0,
                    subxacts: Vec::new(),
                    schema: Vec::new(),
                },
            );
        }
        self.update_gauge();
        Ok(())
    }

    /// A message of the stream block of `top`, made by (sub)transaction `sub`.
    pub(super) fn add(
        &mut self,
        top: u32,
        sub: u32,
        lsn: Lsn,
        data: Bytes,
        schema: bool,
    ) -> Result<(), SpillError> {
        let Streamed { dir, open, .. } = self;
        let spill = open
            .get_mut(&top)
            .ok_or(SpillError::NotStarted { xid: top })?;
        if sub != top && !spill.subxacts.iter().any(|(x, _)| *x == sub) {
            spill.subxacts.push((sub, spill.len));
        }
        if schema {
            spill.schema.push((spill.len, lsn, data.clone()));
        }
        spill.write(lsn, &data).map_err(|e| error(dir, e))
    }

    /// Stream Abort: the whole transaction when `sub == top`, else one
    /// subtransaction and everything after its first message.
    pub(super) fn abort(&mut self, top: u32, sub: u32) -> Result<(), SpillError> {
        if sub == top {
            if self.open.remove(&top).is_some() {
                self.aborted.increment(1);
            }
            self.update_gauge();
            return Ok(());
        }
        let Streamed { dir, open, .. } = self;
        let Some(spill) = open.get_mut(&top) else {
            return Ok(());
        };
        // A subtransaction that never sent a change has nothing to cut.
        let Some(at) = spill.subxacts.iter().position(|(x, _)| *x == sub) else {
            return Ok(());
        };
        spill.cut(at).map_err(|e| error(dir, e))?;
        self.update_gauge();
        Ok(())
    }

    /// Stream Commit: the transaction's messages, to be read back in order.
    /// A transaction that sent no message in any block has an empty replay.
    pub(super) fn commit(&mut self, commit: StreamCommit) -> Result<Replay, SpillError> {
        let spill = self.open.remove(&commit.xid);
        self.committed.increment(1);
        self.update_gauge();
        let (file, remaining) = match spill {
            Some(spill) => {
                let len = spill.len;
                let mut file = spill
                    .file
                    .into_inner()
                    .map_err(|e| self.error(e.into_error()))?;
                file.seek(SeekFrom::Start(0)).map_err(|e| self.error(e))?;
                (Some(BufReader::with_capacity(256 * 1024, file)), len)
            }
            None => (None, 0),
        };
        Ok(Replay {
            decoder: pgoutput::Decoder::in_stream_block(commit.xid),
            file,
            remaining,
            commit,
        })
    }

    /// Bytes in the spill files of open streamed transactions.
    pub(super) fn spilled_bytes(&self) -> u64 {
        self.open.values().map(|s| s.len).sum()
    }

    fn update_gauge(&self) {
        self.spilled.set(self.spilled_bytes() as f64);
    }

    fn error(&self, source: io::Error) -> SpillError {
        error(&self.dir, source)
    }
}

fn error(dir: &Path, source: io::Error) -> SpillError {
    SpillError::Io {
        dir: dir.to_path_buf(),
        source,
    }
}

impl Spill {
    fn write(&mut self, lsn: Lsn, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message over 4 GiB"))?;
        self.file.write_all(&lsn.0.to_be_bytes())?;
        self.file.write_all(&len.to_be_bytes())?;
        self.file.write_all(data)?;
        self.len += FRAME_HEADER + u64::from(len);
        Ok(())
    }

    /// Cuts the file back to where the subtransaction at `at` began, then
    /// writes the Relation and Type messages of the cut part again.
    fn cut(&mut self, at: usize) -> io::Result<()> {
        let offset = self.subxacts[at].1;
        self.subxacts.truncate(at);
        let kept = self
            .schema
            .split_off(self.schema.partition_point(|(o, ..)| *o < offset));
        self.file.flush()?;
        let file = self.file.get_mut();
        file.set_len(offset)?;
        file.seek(SeekFrom::Start(offset))?;
        self.len = offset;
        for (_, lsn, data) in kept {
            self.schema.push((self.len, lsn, data.clone()));
            self.write(lsn, &data)?;
        }
        Ok(())
    }
}

/// A committed streamed transaction's messages, read back in order.
pub(super) struct Replay {
    decoder: pgoutput::Decoder,
    file: Option<BufReader<File>>,
    remaining: u64,
    pub(super) commit: StreamCommit,
}

impl Replay {
    /// The next message, or `None` after the last.
    pub(super) fn next(&mut self) -> Result<Option<(Lsn, LogicalMessage)>, ReplayError> {
        let Some(file) = self.file.as_mut().filter(|_| self.remaining > 0) else {
            return Ok(None);
        };
        let mut header = [0u8; FRAME_HEADER as usize];
        file.read_exact(&mut header).map_err(ReplayError::Io)?;
        let lsn = Lsn(u64::from_be_bytes(header[..8].try_into().expect("8 bytes")));
        let len = u32::from_be_bytes(header[8..].try_into().expect("4 bytes"));
        let mut data = vec![0u8; len as usize];
        file.read_exact(&mut data).map_err(ReplayError::Io)?;
        self.remaining = self.remaining.saturating_sub(FRAME_HEADER + u64::from(len));
        let message = self
            .decoder
            .decode(Bytes::from(data))
            .map_err(|source| ReplayError::Decode { lsn, source })?;
        Ok(Some((lsn, message)))
    }
}

/// A spill file could not be created or written.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error(
        "cannot write the spill file of a streamed transaction in {} (replicator.spill_dir)",
        dir.display()
    )]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pgoutput change of streamed transaction {xid} outside its stream block")]
    NotStarted { xid: u32 },
}

/// A spilled transaction could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read back the spill file of a streamed transaction")]
    Io(#[source] io::Error),
    #[error("malformed pgoutput message at {lsn} in a streamed transaction")]
    Decode {
        lsn: Lsn,
        #[source]
        source: pgoutput::DecodeError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pgoutput Insert inside a stream block: xid, relation, a one-column
    /// text tuple.
    fn insert(xid: u32, value: &str) -> Bytes {
        let mut b = vec![b'I'];
        b.extend_from_slice(&xid.to_be_bytes());
        b.extend_from_slice(&7u32.to_be_bytes());
        b.push(b'N');
        b.extend_from_slice(&1u16.to_be_bytes());
        b.push(b't');
        b.extend_from_slice(&(value.len() as u32).to_be_bytes());
        b.extend_from_slice(value.as_bytes());
        Bytes::from(b)
    }

    /// A Relation message of relation 7 (`public.t`, one text column).
    fn relation(xid: u32) -> Bytes {
        let mut b = vec![b'R'];
        b.extend_from_slice(&xid.to_be_bytes());
        b.extend_from_slice(&7u32.to_be_bytes());
        b.extend_from_slice(b"public\0t\0");
        b.push(b'd');
        b.extend_from_slice(&1u16.to_be_bytes());
        b.push(1);
        b.extend_from_slice(b"v\0");
        b.extend_from_slice(&25u32.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        Bytes::from(b)
    }

    fn commit(xid: u32) -> StreamCommit {
        StreamCommit {
            xid,
            flags: 0,
            commit_lsn: 100,
            end_lsn: 108,
            commit_time_us: 0,
        }
    }

    /// What a replay yields: `R` for a relation, the value for an insert.
    fn replayed(mut replay: Replay) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((_, message)) = replay.next().unwrap() {
            out.push(match message {
                LogicalMessage::Relation(r) => format!("R{}", r.xid.unwrap()),
                LogicalMessage::Insert(i) => match &i.new[0] {
                    pgoutput::TupleValue::Text(t) => String::from_utf8(t.to_vec()).unwrap(),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            });
        }
        out
    }

    fn streamed() -> Streamed {
        Streamed::new(std::env::temp_dir())
    }

    #[test]
    fn a_committed_transaction_replays_its_blocks_in_order() {
        let mut s = streamed();
        s.start(10, true).unwrap();
        s.add(10, 10, Lsn(1), relation(10), true).unwrap();
        s.add(10, 10, Lsn(2), insert(10, "a"), false).unwrap();
        // Another block later: the same file goes on.
        s.start(10, false).unwrap();
        s.add(10, 10, Lsn(3), insert(10, "b"), false).unwrap();
        assert!(s.spilled_bytes() > 0);
        let replay = s.commit(commit(10)).unwrap();
        assert_eq!(s.spilled_bytes(), 0);
        assert_eq!(replayed(replay), ["R10", "a", "b"]);
    }

    #[test]
    fn an_aborted_subtransaction_is_cut_and_keeps_its_relations() {
        let mut s = streamed();
        s.start(10, true).unwrap();
        s.add(10, 10, Lsn(1), insert(10, "top1"), false).unwrap();
        // Subtransaction 11 sends the relation first, then a row; 12 is
        // under it.
        s.add(10, 11, Lsn(2), relation(11), true).unwrap();
        s.add(10, 11, Lsn(3), insert(11, "sub11"), false).unwrap();
        s.add(10, 12, Lsn(4), insert(12, "sub12"), false).unwrap();
        s.abort(10, 12).unwrap();
        s.abort(10, 11).unwrap();
        // Unknown or already cut subtransactions change nothing.
        s.abort(10, 12).unwrap();
        s.abort(10, 99).unwrap();
        s.add(10, 10, Lsn(5), insert(10, "top2"), false).unwrap();
        assert_eq!(
            replayed(s.commit(commit(10)).unwrap()),
            ["top1", "R11", "top2"]
        );
    }

    #[test]
    fn an_abort_of_the_whole_transaction_drops_it_and_others_go_on() {
        let mut s = streamed();
        s.start(10, true).unwrap();
        s.add(10, 10, Lsn(1), insert(10, "x"), false).unwrap();
        s.start(20, true).unwrap();
        s.add(20, 21, Lsn(2), insert(21, "y"), false).unwrap();
        s.abort(10, 10).unwrap();
        assert_eq!(replayed(s.commit(commit(20)).unwrap()), ["y"]);
        // A streamed transaction that sent nothing (or was dropped) replays
        // nothing.
        assert!(replayed(s.commit(commit(10)).unwrap()).is_empty());
        // A change for a transaction that never started is refused.
        assert!(matches!(
            s.add(30, 30, Lsn(3), insert(30, "z"), false),
            Err(SpillError::NotStarted { xid: 30 })
        ));
    }

    #[test]
    fn a_first_segment_starts_the_transaction_afresh() {
        let mut s = streamed();
        s.start(10, true).unwrap();
        s.add(10, 10, Lsn(1), insert(10, "old"), false).unwrap();
        s.start(10, true).unwrap();
        s.add(10, 10, Lsn(2), insert(10, "new"), false).unwrap();
        assert_eq!(replayed(s.commit(commit(10)).unwrap()), ["new"]);
    }
}
