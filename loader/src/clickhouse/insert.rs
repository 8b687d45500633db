//! RowBinary inserts of package rows, and the TOAST fill-in read.
//!
//! The columns are only known at run time (from the relation), so rows are
//! encoded by hand ([`super::encode`]) into one RowBinary body and sent as one
//! `INSERT INTO db.t (cols…) FORMAT RowBinary` through the `clickhouse`
//! crate's formatted insert: one JetStream batch becomes one INSERT, and the
//! loader acks the batch only after [`InsertBuilder::send`] returned `Ok`
//! (ARCHITECTURE.md invariant 1).
//!
//! Every row carries `_sluice_version = sluice_proto::row_version(pkg, i)` so
//! repeating an INSERT is harmless (invariant 2). A DELETE becomes a row with
//! the key, defaults (NULL where nullable) elsewhere, and `_sluice_deleted = 1`.
//! An UPDATE that changed the key also writes such a delete row for the old key.
//!
//! Unchanged TOAST values (pgoutput omits them when an UPDATE did not touch
//! them) are filled from the newest earlier row of the same key in the same
//! builder, else from the table's current row read by
//! [`super::toast::fetch_current`].
//!
//! Most packages need nothing from other rows: [`EncodedRows::transcode`]
//! encodes them on the loader's decode threads, ahead of their INSERT, and
//! the builder adds their bytes as they are. An INSERT that fills in TOAST
//! values encodes every package in it by hand, so that the rows it fills
//! from are in the builder.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use clickhouse::insert_formatted::CompressedData;
use clickhouse::{Client, Compression};
use sluice_proto::v1;
use sluice_proto::v1::value::Kind;

use super::encode::{encode_value, value_len, write_default};
use super::error::{Error, ValueError};
use super::schema::{TargetColumn, TargetTable};
use super::toast::{CurrentRows, encode_key};

/// Values stored as something other than themselves, per column (for
/// `sluice_value_clamped_total{table,column}`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClampCounts(pub BTreeMap<String, u64>);

impl ClampCounts {
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Clamps of one column (0 if none).
    pub fn get(&self, column: &str) -> u64 {
        self.0.get(column).copied().unwrap_or(0)
    }
}

/// What one INSERT wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InsertReport {
    /// Rows in the INSERT (delete rows and old-key delete rows included).
    pub rows: usize,
    /// Size of the uncompressed RowBinary body.
    pub bytes: usize,
    pub clamped: ClampCounts,
}

/// Whether a row holds a TOAST value pgoutput left out (unchanged).
fn has_unchanged_toast(row: &v1::Row) -> bool {
    row.values
        .iter()
        .any(|v| matches!(v.kind, Some(Kind::UnchangedToast(_))))
}

/// Source rows of packages by what they are, in the order of
/// [`OpCounts::NAMES`] (for `sluice_loaded_rows_total{op}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCounts(pub [u64; 4]);

impl OpCounts {
    pub const NAMES: [&'static str; 4] = ["snapshot", "insert", "update", "delete"];

    /// Counts one row of a package of kind `package_kind`.
    pub fn add(&mut self, package_kind: i32, op: i32) {
        let index = if package_kind == v1::Kind::Snapshot as i32 {
            0
        } else {
            match v1::Op::try_from(op) {
                Ok(v1::Op::Insert) => 1,
                Ok(v1::Op::Update) => 2,
                _ => 3,
            }
        };
        self.0[index] += 1;
    }

    /// The rows of a package with its rows decoded.
    pub fn of(package: &v1::Package) -> OpCounts {
        let mut counts = OpCounts::default();
        for row in &package.rows {
            counts.add(package.kind, row.op);
        }
        counts
    }

    pub fn merge(&mut self, other: &OpCounts) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            *mine += theirs;
        }
    }
}

/// The rows of one CHANGES or SNAPSHOT package in RowBinary, encoded (and
/// compressed, when the client compresses) before the batch is applied: the
/// loader encodes the next batch on blocking threads while the current one's
/// INSERTs run, so the INSERT itself only sends bytes
/// ([`InsertBuilder::push_encoded`]).
#[derive(Debug, Clone)]
pub struct EncodedRows {
    /// The columns the rows were encoded for; an INSERT into a table typed
    /// otherwise encodes the package again.
    columns: Vec<TargetColumn>,
    /// The RowBinary as it is, kept when it was not compressed ahead, and
    /// when asked to: for CHANGES packages of a table being resynced, which
    /// go into two INSERTs (the live table and the shadow). Otherwise only
    /// the compressed chunk is kept: keeping both doubled a batch's memory
    /// for the rare INSERT sent again.
    body: Option<Bytes>,
    compressed: Precompressed,
    /// Size of the RowBinary.
    len: usize,
    rows: usize,
    clamped: ClampCounts,
    /// The package's source rows by operation.
    pub ops: OpCounts,
}

impl EncodedRows {
    /// Encodes the rows of a package for `target`'s columns straight from
    /// their protobuf bytes (`raw[range]` each, see [`sluice_proto::rows`]),
    /// one row at a time: no decoded copy of the package's rows is kept.
    /// `header` is the rest of the package. `None` when the rows cannot be
    /// encoded on their own: a row holds an unchanged TOAST value (filled
    /// from other rows), or a row does not decode or encode (the caller then
    /// decodes the package whole, and the INSERT reports the row at fault).
    ///
    /// With a `compression` other than `None` the body is compressed here
    /// too, as the INSERT would (see [`Precompressed`]); the plain body is
    /// then kept too only with `keep_body`.
    pub fn transcode(
        target: &TargetTable,
        header: &v1::Package,
        raw: &[u8],
        rows: &[Range<usize>],
        reader: &mut sluice_proto::rows::RowReader,
        compression: Compression,
        keep_body: bool,
    ) -> Option<EncodedRows> {
        let mut builder = InsertBuilder::new(target);
        // RowBinary is about as long as the rows' protobuf bytes plus each
        // row's version and flags: one allocation instead of a dozen.
        let protobuf = rows
            .first()
            .zip(rows.last())
            .map_or(0, |(f, l)| l.end - f.start);
        builder.buf.reserve(protobuf + rows.len() * 24);
        let mut ops = OpCounts::default();
        let none = CurrentRows::default();
        for (index, range) in rows.iter().enumerate() {
            let row = reader.read(raw.get(range.clone())?).ok()?;
            if has_unchanged_toast(row) {
                return None;
            }
            builder
                .push_row(row, sluice_proto::row_version(header, index), &none)
                .ok()?;
            ops.add(header.kind, row.op);
        }
        Some(Self::finish(target, builder, ops, compression, keep_body))
    }

    /// Encodes the rows of a snapshot package that carries them as `COPY`
    /// text (`text`, see [`sluice_proto::values::copy`]) for `target`'s
    /// columns, one line at a time, as [`EncodedRows::transcode`] does for
    /// protobuf rows. `None` when a line does not decode or encode, or the
    /// package's `copy_rows` is not the number of lines: the caller then
    /// decodes the package whole, which reports what is wrong.
    pub fn transcode_copy(
        target: &TargetTable,
        header: &v1::Package,
        text: &[u8],
        decoder: &mut sluice_proto::values::copy::RowDecoder,
        compression: Compression,
        keep_body: bool,
    ) -> Option<EncodedRows> {
        let mut builder = InsertBuilder::new(target);
        // RowBinary is about as long as the text plus each row's version
        // and flags (`copy_rows` is untrusted: a line takes at least one
        // byte).
        let rows = (header.copy_rows as usize).min(text.len());
        builder.buf.reserve(text.len() + rows * 24);
        let mut ops = OpCounts::default();
        let none = CurrentRows::default();
        let mut index = 0usize;
        let lines = decoder
            .for_each(text, |row| {
                builder
                    .push_row(row, sluice_proto::row_version(header, index), &none)
                    .map_err(|_| CopyRefused)?;
                ops.add(header.kind, row.op);
                index += 1;
                Ok::<(), CopyRefused>(())
            })
            .ok()?;
        if lines != u64::from(header.copy_rows) {
            return None;
        }
        Some(Self::finish(target, builder, ops, compression, keep_body))
    }

    fn finish(
        target: &TargetTable,
        builder: InsertBuilder,
        ops: OpCounts,
        compression: Compression,
        keep_body: bool,
    ) -> EncodedRows {
        let compressed = Precompressed::new(&builder.buf, compression);
        let len = builder.buf.len();
        let body = (keep_body || !compressed.is_made()).then(|| Bytes::from(builder.buf));
        EncodedRows {
            columns: target.columns.clone(),
            body,
            compressed,
            len,
            rows: builder.rows,
            clamped: builder.clamped,
            ops,
        }
    }
}

/// A line of `COPY` text that did not decode or encode (the whole package is
/// decoded again to say why).
struct CopyRefused;

impl From<sluice_proto::values::copy::CopyError> for CopyRefused {
    fn from(_: sluice_proto::values::copy::CopyError) -> Self {
        CopyRefused
    }
}

/// A package's RowBinary compressed for ClickHouse (LZ4 blocks, as the
/// client would compress it while sending) on the decode threads, ahead of
/// its INSERT: compressing inside the INSERT held ClickHouse waiting, and it
/// was a fifth of the loader's CPU. The crate's compressed chunk can be sent
/// only once; where the plain body is not kept beside it (see
/// [`EncodedRows`]), an INSERT sent again after an error encodes the package
/// again from the package as stored ([`InsertBuilder::push_encoded`] says so).
#[derive(Clone)]
struct Precompressed(Option<Arc<Mutex<Option<CompressedData>>>>);

impl Precompressed {
    fn new(body: &[u8], compression: Compression) -> Precompressed {
        if compression == Compression::None || body.is_empty() {
            return Precompressed(None);
        }
        Precompressed(
            CompressedData::new(body, compression)
                .ok()
                .map(|data| Arc::new(Mutex::new(Some(data)))),
        )
    }

    /// Whether a compressed chunk was made (sent or not).
    fn is_made(&self) -> bool {
        self.0.is_some()
    }

    /// The compressed chunk, unless it was taken for an INSERT already.
    fn take(&self) -> Option<CompressedData> {
        self.0.as_ref()?.lock().ok()?.take()
    }
}

impl std::fmt::Debug for Precompressed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Precompressed"
        } else {
            "NotPrecompressed"
        })
    }
}

/// One part of an INSERT's body.
enum Piece {
    /// Compressed, when the client compresses, as it is sent.
    Plain(Bytes),
    /// Encoded and compressed ahead, sent as it is; and its size before.
    Compressed(CompressedData, usize),
}

impl Piece {
    /// Size of the RowBinary it holds.
    fn len(&self) -> usize {
        match self {
            Piece::Plain(body) => body.len(),
            Piece::Compressed(_, len) => *len,
        }
    }
}

impl std::fmt::Debug for Piece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Piece::Plain(body) => write!(f, "Plain({} bytes)", body.len()),
            Piece::Compressed(_, len) => write!(f, "Compressed({len} bytes)"),
        }
    }
}

/// Builds the RowBinary body of one INSERT into one target table.
#[derive(Debug)]
pub struct InsertBuilder<'a> {
    target: &'a TargetTable,
    /// Finished parts of the body, in order, before `buf`.
    pieces: Vec<Piece>,
    buf: Vec<u8>,
    rows: usize,
    clamped: ClampCounts,
    /// Byte ranges in `buf` of each column of the newest row of each key, to
    /// fill unchanged TOAST values of later updates in the same INSERT. Only
    /// keys in [`CurrentRows::requested`] (the rows with such values) are kept.
    latest: HashMap<Vec<u8>, Vec<Range<usize>>>,
}

impl<'a> InsertBuilder<'a> {
    pub fn new(target: &'a TargetTable) -> Self {
        InsertBuilder {
            target,
            pieces: Vec::new(),
            buf: Vec::new(),
            rows: 0,
            clamped: ClampCounts::default(),
            latest: HashMap::new(),
        }
    }

    /// Rows added so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Size of the body so far.
    pub fn len_bytes(&self) -> usize {
        self.pieces.iter().map(Piece::len).sum::<usize>() + self.buf.len()
    }

    /// Adds rows encoded ahead by [`EncodedRows::transcode`], as they are.
    /// Returns `false`, adding nothing, when they were encoded for other
    /// columns or when this builder keeps rows for TOAST fill-ins (their
    /// byte ranges point into the body being built), or when their
    /// compressed chunk, the only form kept, was taken by an earlier INSERT
    /// (one that failed); the caller then adds the package with
    /// [`Self::push_package`].
    pub fn push_encoded(&mut self, encoded: &EncodedRows) -> bool {
        if encoded.columns != self.target.columns || !self.latest.is_empty() {
            return false;
        }
        let piece = match (encoded.compressed.take(), &encoded.body) {
            (Some(data), _) => Piece::Compressed(data, encoded.len),
            (None, Some(body)) => Piece::Plain(body.clone()),
            (None, None) => return false,
        };
        if !self.buf.is_empty() {
            self.pieces
                .push(Piece::Plain(Bytes::from(std::mem::take(&mut self.buf))));
        }
        self.pieces.push(piece);
        self.rows += encoded.rows;
        for (column, count) in &encoded.clamped.0 {
            *self.clamped.0.entry(column.clone()).or_default() += count;
        }
        true
    }

    /// The `INSERT … FORMAT RowBinary` statement the body belongs to.
    pub fn insert_sql(&self) -> String {
        format!(
            "INSERT INTO {} ({}) FORMAT RowBinary",
            self.target.qualified(),
            self.target.written_columns()
        )
    }

    /// Adds every row of a CHANGES or SNAPSHOT package. `current` fills
    /// unchanged TOAST values not found earlier in this builder.
    pub fn push_package(
        &mut self,
        package: &v1::Package,
        current: &CurrentRows,
    ) -> Result<(), Error> {
        for (i, row) in package.rows.iter().enumerate() {
            self.push_row(row, sluice_proto::row_version(package, i), current)
                .map_err(|e| match e {
                    Error::Value { column, source, .. } => Error::Value {
                        column,
                        row: i,
                        source,
                    },
                    Error::RowShape {
                        values, columns, ..
                    } => Error::RowShape {
                        row: i,
                        values,
                        columns,
                    },
                    other => other,
                })?;
        }
        Ok(())
    }

    /// Adds one row with its version. On error the body is left as it was.
    pub fn push_row(
        &mut self,
        row: &v1::Row,
        version: u128,
        current: &CurrentRows,
    ) -> Result<(), Error> {
        let columns = self.target.columns.len();
        if row.values.len() != columns {
            return Err(Error::RowShape {
                row: 0,
                values: row.values.len(),
                columns,
            });
        }
        let value_err = |(column, source): (String, ValueError)| Error::Value {
            column,
            row: 0,
            source,
        };
        let delete = row.op == v1::Op::Delete as i32;
        let old_key = row.op == v1::Op::Update as i32 && !row.old_key.is_empty();
        // The key is only needed for deletes, key changes and TOAST fill-ins;
        // a plain insert or update (most rows) skips encoding it twice.
        let key = if delete || old_key || !current.requested.is_empty() || has_unchanged_toast(row)
        {
            Some(encode_key(self.target, &row.values).map_err(value_err)?)
        } else {
            None
        };
        let mark = (self.buf.len(), self.rows);
        let result = (|| {
            if old_key {
                let old_key = self.old_key(&row.old_key).map_err(value_err)?;
                if Some(&old_key) != key.as_ref() {
                    self.push_delete(&old_key, version);
                }
            }
            match &key {
                Some(key) if delete => self.push_delete(key, version),
                _ => self.push_values(key.as_deref(), row, version, current)?,
            }
            Ok(())
        })();
        if result.is_err() {
            self.buf.truncate(mark.0);
            self.rows = mark.1;
        }
        result
    }

    /// Encodes the old key of an UPDATE, given either as a full row (key
    /// columns picked by position) or as just the key columns in order.
    fn old_key(&self, old: &[v1::Value]) -> Result<Vec<u8>, (String, ValueError)> {
        if old.len() == self.target.columns.len() {
            return encode_key(self.target, old);
        }
        let mut out = Vec::new();
        for (column, value) in self.target.key_columns().zip(old) {
            encode_value(&mut out, &column.ch_type, value).map_err(|e| (column.name.clone(), e))?;
        }
        Ok(out)
    }

    /// A tombstone: the key, defaults elsewhere, `_sluice_deleted = 1`.
    fn push_delete(&mut self, key: &[u8], version: u128) {
        let mut key_bytes = key;
        for column in &self.target.columns {
            if column.key {
                // Key columns are fixed by `key`; find this column's slice.
                let len = value_len(&column.ch_type, key_bytes).unwrap_or(key_bytes.len());
                self.buf.extend_from_slice(&key_bytes[..len]);
                key_bytes = &key_bytes[len..];
            } else {
                write_default(&mut self.buf, &column.ch_type);
            }
        }
        self.buf.extend_from_slice(&version.to_le_bytes());
        self.buf.push(1);
        self.rows += 1;
        self.latest.remove(key);
    }

    /// `key` is `None` only for rows without unchanged TOAST values when no
    /// key is [`CurrentRows::requested`].
    fn push_values(
        &mut self,
        key: Option<&[u8]>,
        row: &v1::Row,
        version: u128,
        current: &CurrentRows,
    ) -> Result<(), Error> {
        let remember = key.filter(|k| current.requested.contains(*k));
        let mut ranges = Vec::with_capacity(if remember.is_some() {
            row.values.len()
        } else {
            0
        });
        let mut row_clamps = Vec::new();
        for (index, (column, value)) in self.target.columns.iter().zip(&row.values).enumerate() {
            let start = self.buf.len();
            if let Some(Kind::UnchangedToast(_)) = value.kind {
                let key = key.unwrap_or_default();
                if let Some(range) = self.latest.get(key).map(|r| r[index].clone()) {
                    self.buf.extend_from_within(range);
                } else {
                    let bytes = current
                        .columns
                        .iter()
                        .position(|c| *c == column.name)
                        .and_then(|i| current.rows.get(key).map(|values| &values[i]))
                        .ok_or_else(|| Error::Value {
                            column: column.name.clone(),
                            row: 0,
                            source: ValueError::ToastMissing,
                        })?;
                    self.buf.extend_from_slice(bytes);
                }
            } else {
                let clamps =
                    encode_value(&mut self.buf, &column.ch_type, value).map_err(|source| {
                        Error::Value {
                            column: column.name.clone(),
                            row: 0,
                            source,
                        }
                    })?;
                if clamps > 0 {
                    row_clamps.push((index, clamps));
                }
            }
            if remember.is_some() {
                ranges.push(start..self.buf.len());
            }
        }
        self.buf.extend_from_slice(&version.to_le_bytes());
        self.buf.push(0);
        self.rows += 1;
        for (index, clamps) in row_clamps {
            *self
                .clamped
                .0
                .entry(self.target.columns[index].name.clone())
                .or_default() += clamps;
        }
        if let Some(key) = remember {
            self.latest.insert(key.to_vec(), ranges);
        }
        Ok(())
    }

    /// Sends the rows as one INSERT. Nothing is sent for an empty builder.
    pub async fn send(self, client: &Client) -> Result<InsertReport, Error> {
        let report = InsertReport {
            rows: self.rows,
            bytes: self.len_bytes(),
            clamped: self.clamped.clone(),
        };
        if self.rows == 0 {
            return Ok(report);
        }
        let mut insert = client.insert_formatted_with(self.insert_sql());
        let mut pieces = self.pieces;
        if !self.buf.is_empty() {
            pieces.push(Piece::Plain(Bytes::from(self.buf)));
        }
        // Each piece is compressed (LZ4) on its own, ahead or as it is
        // queued, so ClickHouse starts parsing before the last one is ready.
        for piece in pieces {
            let sent = match piece {
                Piece::Compressed(data, _) => insert.send_compressed(data).await,
                Piece::Plain(body) => insert.send(body).await,
            };
            sent.map_err(Error::ch("insert"))?;
        }
        insert.end().await.map_err(Error::ch("insert"))?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INT8: u32 = 20;
    const TEXT: u32 = 25;

    fn target() -> TargetTable {
        let column = |name: &str, oid: u32, key: bool| v1::Column {
            name: name.into(),
            type_oid: oid,
            type_kind: v1::TypeKind::Base as i32,
            nullable: !key,
            key,
            ..Default::default()
        };
        let relation = v1::Relation {
            columns: vec![column("id", INT8, true), column("s", TEXT, false)],
            ..Default::default()
        };
        TargetTable::from_relation("db", "public", "t", &relation).unwrap()
    }

    fn value(kind: Kind) -> v1::Value {
        v1::Value { kind: Some(kind) }
    }

    fn row(op: v1::Op, id: i64, s: Kind, old_key: Vec<v1::Value>) -> v1::Row {
        v1::Row {
            op: op as i32,
            values: vec![value(Kind::Int(id)), value(s)],
            old_key,
        }
    }

    fn package(commit_lsn: u64, rows: Vec<v1::Row>) -> v1::Package {
        v1::Package {
            kind: v1::Kind::Changes as i32,
            commit_lsn,
            rows,
            ..Default::default()
        }
    }

    /// What the loader's decode threads do: the package's protobuf bytes,
    /// split, then transcoded.
    fn transcode(target: &TargetTable, package: &v1::Package) -> Option<EncodedRows> {
        transcode_compressed(target, package, Compression::None, false)
    }

    fn transcode_compressed(
        target: &TargetTable,
        package: &v1::Package,
        compression: Compression,
        keep_body: bool,
    ) -> Option<EncodedRows> {
        use sluice_proto::Message as _;
        let raw = package.encode_to_vec();
        let split = sluice_proto::rows::split(&raw).unwrap();
        let mut reader = sluice_proto::rows::RowReader::default();
        EncodedRows::transcode(
            target,
            &split.header,
            &raw,
            &split.rows,
            &mut reader,
            compression,
            keep_body,
        )
    }

    fn body(builder: &InsertBuilder) -> Vec<u8> {
        let mut out: Vec<u8> = builder
            .pieces
            .iter()
            .flat_map(|p| match p {
                Piece::Plain(body) => body.iter(),
                Piece::Compressed(..) => panic!("compressed ahead"),
            })
            .copied()
            .collect();
        out.extend_from_slice(&builder.buf);
        out
    }

    #[test]
    fn rows_encoded_ahead_are_the_bytes_the_builder_writes() {
        let target = target();
        let first = package(
            100,
            vec![
                row(v1::Op::Insert, 1, Kind::Text("a".into()), vec![]),
                row(v1::Op::Update, 2, Kind::Null(v1::Null {}), vec![]),
            ],
        );
        let second = package(
            200,
            vec![
                row(v1::Op::Delete, 1, Kind::Null(v1::Null {}), vec![]),
                // A key change: a delete row for the old key, then the row.
                row(
                    v1::Op::Update,
                    3,
                    Kind::Text("c".into()),
                    vec![value(Kind::Int(2))],
                ),
            ],
        );
        let none = CurrentRows::default();
        let mut by_hand = InsertBuilder::new(&target);
        by_hand.push_package(&first, &none).unwrap();
        by_hand.push_package(&second, &none).unwrap();

        // Mixed: one package by hand, the other encoded ahead.
        let encoded = transcode(&target, &second).unwrap();
        assert_eq!(encoded.rows, 3);
        assert_eq!(encoded.ops, OpCounts::of(&second));
        assert_eq!(encoded.ops, OpCounts([0, 0, 1, 1]));
        let mut mixed = InsertBuilder::new(&target);
        mixed.push_package(&first, &none).unwrap();
        assert!(mixed.push_encoded(&encoded));
        assert_eq!(mixed.rows(), by_hand.rows());
        assert_eq!(mixed.len_bytes(), by_hand.len_bytes());
        assert_eq!(body(&mixed), body(&by_hand));

        // Versions come from the header: a snapshot's rows sit just below
        // its consistent point, from its first ordinal on.
        let mut snapshot = first.clone();
        snapshot.kind = v1::Kind::Snapshot as i32;
        snapshot.first_row_ordinal = 5;
        let mut by_hand = InsertBuilder::new(&target);
        by_hand.push_package(&snapshot, &none).unwrap();
        let mut ahead = InsertBuilder::new(&target);
        let encoded_snapshot = transcode(&target, &snapshot).unwrap();
        assert_eq!(encoded_snapshot.ops, OpCounts([2, 0, 0, 0]));
        assert!(ahead.push_encoded(&encoded_snapshot));
        assert_eq!(body(&ahead), body(&by_hand));

        // Encoded for other columns: refused, nothing added.
        let mut other = target.clone();
        other.columns[1].name = "renamed".into();
        let mut refusing = InsertBuilder::new(&other);
        assert!(!refusing.push_encoded(&encoded));
        assert_eq!(refusing.rows(), 0);
        assert_eq!(refusing.len_bytes(), 0);
    }

    /// A snapshot package's rows as `COPY` text encode to the bytes the same
    /// rows as protobuf do, and a package whose text or row count lies is
    /// left to the whole decode (which refuses it).
    #[test]
    fn copy_text_encodes_as_its_rows_do() {
        use sluice_proto::values::TypeCategory;
        let target = target();
        let mut relation = v1::Relation {
            columns: vec![
                v1::Column {
                    name: "id".into(),
                    type_name: "int8".into(),
                    text_category: TypeCategory::Int.to_wire() as i32,
                    ..Default::default()
                },
                v1::Column {
                    name: "s".into(),
                    type_name: "text".into(),
                    text_category: TypeCategory::Text.to_wire() as i32,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let mut rows = package(
            100,
            vec![
                row(v1::Op::Insert, 1, Kind::Text("a\tb".into()), vec![]),
                row(v1::Op::Insert, 2, Kind::Null(v1::Null {}), vec![]),
                row(v1::Op::Insert, -3, Kind::Text(String::new()), vec![]),
            ],
        );
        rows.kind = v1::Kind::Snapshot as i32;
        rows.first_row_ordinal = 7;
        rows.relation = Some(relation.clone());
        let mut text = rows.clone();
        text.rows.clear();
        text.copy_text = "1\ta\\tb\n2\t\\N\n-3\t\n".into();
        text.copy_rows = 3;
        let copy = |package: &v1::Package| {
            let mut decoder =
                sluice_proto::values::copy::RowDecoder::new(package.relation.as_ref().unwrap())
                    .unwrap();
            EncodedRows::transcode_copy(
                &target,
                package,
                &package.copy_text,
                &mut decoder,
                Compression::None,
                false,
            )
        };
        let from_rows = transcode(&target, &rows).unwrap();
        let from_text = copy(&text).unwrap();
        assert_eq!(from_text.rows, 3);
        assert_eq!(from_text.ops, OpCounts([3, 0, 0, 0]));
        let (mut a, mut b) = (InsertBuilder::new(&target), InsertBuilder::new(&target));
        assert!(a.push_encoded(&from_rows) && b.push_encoded(&from_text));
        assert_eq!(body(&b), body(&a));

        let mut miscounted = text.clone();
        miscounted.copy_rows = 4;
        assert!(copy(&miscounted).is_none());
        let mut bad = text.clone();
        bad.copy_text = "1\ta\nx\tb\n".into();
        bad.copy_rows = 2;
        assert!(copy(&bad).is_none());
        relation.columns.pop();
        let mut narrow = text;
        narrow.relation = Some(relation);
        assert!(copy(&narrow).is_none(), "a field more than the columns");
    }

    #[test]
    fn rows_compressed_ahead_go_into_one_insert_unless_kept_for_a_second() {
        let target = target();
        let package = package(
            100,
            vec![row(v1::Op::Insert, 1, Kind::Text("a".into()), vec![])],
        );
        let none = CurrentRows::default();
        let mut by_hand = InsertBuilder::new(&target);
        by_hand.push_package(&package, &none).unwrap();
        let encoded = transcode_compressed(&target, &package, Compression::Lz4, false).unwrap();
        // Only the compressed form is kept.
        assert!(encoded.body.is_none());
        let mut first = InsertBuilder::new(&target);
        assert!(first.push_encoded(&encoded));
        assert_eq!(first.rows(), 1);
        assert_eq!(first.len_bytes(), by_hand.len_bytes());
        assert!(matches!(first.pieces[..], [Piece::Compressed(..)]));
        // The chunk went to the first INSERT: one sent again after it failed
        // must encode the package again, and is told so.
        let mut again = InsertBuilder::new(&target);
        assert!(!again.push_encoded(&encoded));
        assert_eq!(again.rows(), 0);
        assert_eq!(again.len_bytes(), 0);
        // Without compression the body is kept and can be sent any number of times.
        let plain = transcode(&target, &package).unwrap();
        for _ in 0..2 {
            let mut builder = InsertBuilder::new(&target);
            assert!(builder.push_encoded(&plain));
            assert_eq!(body(&builder), body(&by_hand));
        }
        // Kept for a second INSERT (changes of a table being resynced go
        // into the live table's and the shadow's): both get the rows.
        let changes = transcode_compressed(&target, &package, Compression::Lz4, true).unwrap();
        let mut live = InsertBuilder::new(&target);
        assert!(live.push_encoded(&changes));
        assert!(matches!(live.pieces[..], [Piece::Compressed(..)]));
        let mut shadow = InsertBuilder::new(&target);
        assert!(shadow.push_encoded(&changes));
        assert_eq!(body(&shadow), body(&by_hand));
    }

    #[test]
    fn packages_needing_other_rows_or_failing_are_not_encoded_ahead() {
        let target = target();
        let toast = package(
            100,
            vec![row(
                v1::Op::Update,
                1,
                Kind::UnchangedToast(v1::UnchangedToast {}),
                vec![],
            )],
        );
        assert!(transcode(&target, &toast).is_none());
        // A NULL key does not encode; the INSERT reports it with its row.
        let mut bad = row(v1::Op::Insert, 1, Kind::Text("a".into()), vec![]);
        bad.values[0] = value(Kind::Null(v1::Null {}));
        assert!(transcode(&target, &package(100, vec![bad])).is_none());
    }
}
