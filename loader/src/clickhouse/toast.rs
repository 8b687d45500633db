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
                if !self.keys.contains(&key) {
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

/// Reads the current (not deleted) values of `request.columns` for the rows
/// with `request.keys` from `target`, via `SELECT … FINAL`.
///
/// The keys travel as RowBinary inside the query (`format(RowBinary, …)`
/// table function), so any key type matches exactly what the loader wrote.
pub async fn fetch_current(
    client: &Client,
    target: &TargetTable,
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
    let keys: Vec<_> = target.key_columns().collect();
    let columns: Vec<_> = request
        .columns
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
    let mut data = String::with_capacity(request.keys.iter().map(|k| k.len() * 4).sum());
    for byte in request.keys.iter().flatten() {
        data.push_str(&format!("\\x{byte:02x}"));
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
    Ok(current)
}
