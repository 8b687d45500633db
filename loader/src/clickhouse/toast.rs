//! The TOAST fill-in read (ARCHITECTURE.md invariant 2 holds because the
//! values come from the newest live version of the row).
//!
//! pgoutput leaves out a TOASTed value an UPDATE did not touch. An INSERT of
//! such a row needs the value: [`ToastRequest`] collects which rows (by
//! encoded key, [`encode_key`]) and columns of a run of packages need one,
//! and [`fetch_current`] reads them from the target's current rows
//! (`SELECT … FINAL`, deleted rows excluded) into [`CurrentRows`], each value
//! kept in its RowBinary encoding for [`super::InsertBuilder`] to copy.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use bytes::Bytes;
use clickhouse::Client;
use sluice_proto::v1;
use sluice_proto::v1::value::Kind;

use super::encode::{encode_value, value_len};
use super::error::{Error, ValueError};
use super::schema::{DELETED_COLUMN, TargetTable, quote_ident, quote_literal};

/// Current values of some columns of some rows, read from ClickHouse to fill
/// unchanged TOAST values; each value is kept in its RowBinary encoding.
#[derive(Debug, Clone, Default)]
pub struct CurrentRows {
    /// The columns read, in the order of each row's values.
    pub columns: Vec<String>,
    /// RowBinary-encoded key (see [`encode_key`]) → encoded values.
    pub rows: HashMap<Vec<u8>, Vec<Bytes>>,
    /// Every key asked for (found or not): the rows an [`InsertBuilder`]
    /// remembers, because a later row of the same key may need their values.
    pub requested: HashSet<Vec<u8>>,
}

/// Which rows and columns of a package need their TOAST values filled in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToastRequest {
    /// Encoded keys ([`encode_key`]) of the rows with an unchanged TOAST value.
    pub keys: Vec<Vec<u8>>,
    /// Names of the columns holding unchanged TOAST values.
    pub columns: Vec<String>,
    /// `keys` as a set: a bulk UPDATE asks for 100,000s of keys.
    seen: HashSet<Vec<u8>>,
}

impl ToastRequest {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Adds the rows of `package` that carry unchanged TOAST values.
    pub fn add_package(
        &mut self,
        target: &TargetTable,
        package: &v1::Package,
    ) -> Result<(), Error> {
        for (i, row) in package.rows.iter().enumerate() {
            let mut any = false;
            for (column, value) in target.columns.iter().zip(&row.values) {
                if matches!(value.kind, Some(Kind::UnchangedToast(_))) {
                    any = true;
                    if !self.columns.contains(&column.name) {
                        self.columns.push(column.name.clone());
                    }
                }
            }
            if any {
                let key =
                    encode_key(target, &row.values).map_err(|(column, source)| Error::Value {
                        column,
                        row: i,
                        source,
                    })?;
                if self.seen.insert(key.clone()) {
                    self.keys.push(key);
                }
            }
        }
        Ok(())
    }
}

/// The RowBinary encoding of a row's key columns (`values` in relation
/// order), used as the identity of a row. Errors name the column at fault.
pub fn encode_key(
    target: &TargetTable,
    values: &[v1::Value],
) -> Result<Vec<u8>, (String, ValueError)> {
    let mut out = Vec::new();
    for (column, value) in target.columns.iter().zip(values).filter(|(c, _)| c.key) {
        if matches!(value.kind, Some(Kind::UnchangedToast(_))) {
            return Err((column.name.clone(), ValueError::ToastInKey));
        }
        encode_value(&mut out, &column.ch_type, value).map_err(|e| (column.name.clone(), e))?;
    }
    Ok(out)
}

/// Escaped key bytes (`\\xHH`, four characters a byte) one read carries at
/// most: a bulk UPDATE can ask for more keys than fit one query, so they are
/// read in several. Each query raises its own `max_query_size` to its length.
const MAX_KEY_LITERAL: usize = 1 << 20;

/// Reads the current (not deleted) values of `request.columns` for the rows
/// with `request.keys` from `target`, via `SELECT … FINAL`; rows `target`
/// does not have are read from `fallback` (a resync's shadow table falls back
/// to the live table: an UPDATE can reach a row before the snapshot did).
///
/// The keys travel as RowBinary inside the query (`format(RowBinary, …)`
/// table function), so any key type matches exactly what the loader wrote;
/// they are read [`MAX_KEY_LITERAL`] at a time, so any batch size works.
pub async fn fetch_current(
    client: &Client,
    target: &TargetTable,
    fallback: Option<&TargetTable>,
    request: &ToastRequest,
) -> Result<CurrentRows, Error> {
    let mut current = CurrentRows {
        columns: request.columns.clone(),
        rows: HashMap::new(),
        requested: request.keys.iter().cloned().collect(),
    };
    if request.keys.is_empty() || request.columns.is_empty() {
        return Ok(current);
    }
    read_rows(
        client,
        target,
        &request.columns,
        &request.keys,
        &mut current,
    )
    .await?;
    if let Some(fallback) = fallback {
        let missing: Vec<Vec<u8>> = request
            .keys
            .iter()
            .filter(|key| !current.rows.contains_key(*key))
            .cloned()
            .collect();
        if !missing.is_empty() {
            read_rows(client, fallback, &request.columns, &missing, &mut current).await?;
        }
    }
    Ok(current)
}

/// The keys in groups whose escaped literal stays within [`MAX_KEY_LITERAL`]
/// (a single key longer than that gets a group of its own).
fn key_chunks(keys: &[Vec<u8>]) -> Vec<&[Vec<u8>]> {
    let mut chunks = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, key) in keys.iter().enumerate() {
        let len = key.len() * 4;
        if i > start && size + len > MAX_KEY_LITERAL {
            chunks.push(&keys[start..i]);
            (start, size) = (i, 0);
        }
        size += len;
    }
    if start < keys.len() {
        chunks.push(&keys[start..]);
    }
    chunks
}

/// Reads `columns` of the rows with `keys` from `target` into `current`.
async fn read_rows(
    client: &Client,
    target: &TargetTable,
    columns: &[String],
    keys: &[Vec<u8>],
    current: &mut CurrentRows,
) -> Result<(), Error> {
    for chunk in key_chunks(keys) {
        read_chunk(client, target, columns, chunk, current).await?;
    }
    Ok(())
}

async fn read_chunk(
    client: &Client,
    target: &TargetTable,
    names: &[String],
    wanted: &[Vec<u8>],
    current: &mut CurrentRows,
) -> Result<(), Error> {
    let keys: Vec<_> = target.key_columns().collect();
    let columns: Vec<_> = names
        .iter()
        .map(|name| {
            target
                .columns
                .iter()
                .find(|c| &c.name == name)
                .ok_or_else(|| Error::Response(format!("column {name:?} is not in the relation")))
        })
        .collect::<Result<_, _>>()?;
    let key_list = keys
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let structure = keys
        .iter()
        .map(|c| format!("{} {ty}", quote_ident(&c.name), ty = c.ch_type))
        .collect::<Vec<_>>()
        .join(", ");
    let mut data = String::with_capacity(wanted.iter().map(|k| k.len() * 4).sum());
    for byte in wanted.iter().flatten() {
        let _ = write!(data, "\\x{byte:02x}");
    }
    let select_list = columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT {key_list}, {select_list} FROM {} FINAL \
         WHERE ({key_list}) IN (SELECT * FROM format(RowBinary, {}, '{data}')) \
         AND {} = 0",
        target.qualified(),
        quote_literal(&structure),
        quote_ident(DELETED_COLUMN),
    );
    let body = client
        .query_raw(&sql)
        // The server's default (256 KiB) would refuse a large key list.
        .with_setting("max_query_size", (sql.len() + 1024).to_string())
        .fetch_bytes("RowBinary")
        .map_err(Error::ch("read current rows"))?
        .collect()
        .await
        .map_err(Error::ch("read current rows"))?;
    let truncated = || Error::Response("truncated RowBinary row of current values".into());
    let mut pos = 0;
    while pos < body.len() {
        let start = pos;
        for key in &keys {
            pos += value_len(&key.ch_type, &body[pos..]).ok_or_else(truncated)?;
        }
        let key = body[start..pos].to_vec();
        let mut values = Vec::with_capacity(columns.len());
        for column in &columns {
            let len = value_len(&column.ch_type, &body[pos..]).ok_or_else(truncated)?;
            values.push(body.slice(pos..pos + len));
            pos += len;
        }
        current.rows.insert(key, values);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_in_chunks_within_the_literal_bound() {
        let keys: Vec<Vec<u8>> = (0..100_000u64).map(|k| k.to_le_bytes().to_vec()).collect();
        let chunks = key_chunks(&keys);
        assert!(chunks.len() > 1, "100,000 keys fit one query");
        assert!(
            chunks
                .iter()
                .all(|c| c.iter().map(|k| k.len() * 4).sum::<usize>() <= MAX_KEY_LITERAL)
        );
        let rejoined: Vec<&Vec<u8>> = chunks.iter().flat_map(|c| c.iter()).collect();
        assert_eq!(rejoined, keys.iter().collect::<Vec<_>>());
        // A key beyond the bound on its own still gets read.
        let huge = vec![vec![0u8; MAX_KEY_LITERAL], vec![1]];
        assert_eq!(key_chunks(&huge).len(), 2);
        assert!(key_chunks(&[]).is_empty());
    }

    #[test]
    fn a_request_keeps_each_key_once() {
        use super::super::types::ChType;
        let target = super::super::schema::test_target(&[
            ("id", ChType::Int64, true),
            ("big", ChType::String, false),
        ]);
        let row = |id: i64| v1::Row {
            op: v1::Op::Update as i32,
            values: vec![
                v1::Value {
                    kind: Some(Kind::Int(id)),
                },
                v1::Value {
                    kind: Some(Kind::UnchangedToast(v1::UnchangedToast {})),
                },
            ],
            old_key: Vec::new(),
        };
        let package = v1::Package {
            rows: vec![row(1), row(2), row(1)],
            ..Default::default()
        };
        let mut request = ToastRequest::default();
        request.add_package(&target, &package).unwrap();
        request.add_package(&target, &package).unwrap();
        assert_eq!(request.keys.len(), 2);
        assert_eq!(request.columns, ["big"]);
    }
}
