//! Reading a package's rows one at a time instead of all at once.
//!
//! `v1::Package::decode` allocates every row of a package and every text
//! value in it, and the loader then drops them all once the rows are encoded
//! for ClickHouse: for narrow rows that was most of the loader's CPU time.
//! [`split`] decodes every field of a package except `rows` and says where
//! each row's bytes are; [`RowReader`] decodes one row at a time into the same
//! [`v1::Row`], reusing the buffers its values had for the row before.
//!
//! Both take untrusted bytes: bounds-checked reads, typed errors, no panics.
//! They accept what prost accepts for these messages (unknown fields are
//! skipped, the last `op` wins); anything out of the ordinary in a value is
//! handed to prost itself.

use std::ops::Range;

use prost::Message;

use crate::v1::value::Kind;
use crate::{DecodeError, v1};

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// `Package.rows`.
const PACKAGE_ROWS: u32 = 12;
/// `Package.copy_text`.
const PACKAGE_COPY_TEXT: u32 = 17;
/// `Row.op`, `Row.values`, `Row.old_key`.
const ROW_OP: u32 = 1;
const ROW_VALUES: u32 = 2;
const ROW_OLD_KEY: u32 = 3;
/// The `Value.kind` fields read here rather than by prost: `null`, `bool`,
/// `int`, `numeric`, `text`, `bytes`, `uuid`, `json`, `timestamp`,
/// `timestamptz`.
const VALUE_NULL: u32 = 1;
const VALUE_BOOL: u32 = 3;
const VALUE_INT: u32 = 4;
const VALUE_TIMESTAMP: u32 = 12;
const VALUE_TIMESTAMPTZ: u32 = 13;
const VALUE_NUMERIC: u32 = 6;
const VALUE_TEXT: u32 = 7;
const VALUE_BYTES: u32 = 8;
const VALUE_UUID: u32 = 15;
const VALUE_JSON: u32 = 16;

/// A package with its rows left as protobuf bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// Every field of the package but `rows` and `copy_text` (which are
    /// empty).
    pub header: v1::Package,
    /// Where each row's `v1::Row` bytes are in the buffer given to [`split`].
    pub rows: Vec<Range<usize>>,
    /// Where the package's `copy_text` is in that buffer (the last one,
    /// as prost would keep it).
    pub copy_text: Option<Range<usize>>,
}

/// Splits the protobuf bytes of a package (see [`crate::decompress`]).
pub fn split(raw: &[u8]) -> Result<Split, DecodeError> {
    let mut rest = Vec::new();
    let mut rows = Vec::new();
    let mut copy_text = None;
    let mut pos = 0;
    while pos < raw.len() {
        let start = pos;
        let (field, wire) = read_key(raw, &mut pos)?;
        let value = read_field(raw, &mut pos, wire)?;
        if field == PACKAGE_ROWS && wire == LEN {
            rows.push(value);
        } else if field == PACKAGE_COPY_TEXT && wire == LEN {
            copy_text = Some(value);
        } else {
            rest.extend_from_slice(raw.get(start..pos).ok_or_else(truncated)?);
        }
    }
    let header = v1::Package::decode(rest.as_slice()).map_err(DecodeError::Protobuf)?;
    Ok(Split {
        header,
        rows,
        copy_text,
    })
}

/// Decodes rows one after the other into one reused [`v1::Row`].
#[derive(Debug, Default)]
pub struct RowReader {
    row: v1::Row,
}

impl RowReader {
    /// Decodes the `v1::Row` in `bytes`; the result is valid until the next call.
    pub fn read(&mut self, bytes: &[u8]) -> Result<&v1::Row, DecodeError> {
        let row = &mut self.row;
        row.op = 0;
        let (mut values, mut old_key) = (0, 0);
        let mut pos = 0;
        while pos < bytes.len() {
            let (field, wire) = read_key(bytes, &mut pos)?;
            match (field, wire) {
                // Enums are varints; prost keeps the low 32 bits.
                (ROW_OP, VARINT) => row.op = read_varint(bytes, &mut pos)? as i32,
                (ROW_VALUES, LEN) => {
                    let range = read_field(bytes, &mut pos, wire)?;
                    read_value(&bytes[range], slot(&mut row.values, values))?;
                    values += 1;
                }
                (ROW_OLD_KEY, LEN) => {
                    let range = read_field(bytes, &mut pos, wire)?;
                    read_value(&bytes[range], slot(&mut row.old_key, old_key))?;
                    old_key += 1;
                }
                (ROW_OP | ROW_VALUES | ROW_OLD_KEY, _) => {
                    return Err(DecodeError::Wire("a row field has the wrong wire type"));
                }
                _ => {
                    read_field(bytes, &mut pos, wire)?;
                }
            }
        }
        row.values.truncate(values);
        row.old_key.truncate(old_key);
        Ok(row)
    }
}

/// The `index`-th value of a list being refilled: the one already there
/// (its buffers get reused), or a new one at the end.
fn slot(list: &mut Vec<v1::Value>, index: usize) -> &mut v1::Value {
    if index >= list.len() {
        list.resize_with(index + 1, v1::Value::default);
    }
    &mut list[index]
}

/// Decodes a `v1::Value` into `value`. A value that is one text or bytes
/// field (the common case) is copied into the buffer `value` already holds
/// if it is of the same kind; a value that is one integer, bool or null
/// field is read here too; anything else is decoded by prost.
fn read_value(bytes: &[u8], value: &mut v1::Value) -> Result<(), DecodeError> {
    let mut pos = 0;
    if let Ok((field, VARINT)) = read_key(bytes, &mut pos)
        && let Ok(raw) = read_varint(bytes, &mut pos)
        && pos == bytes.len()
    {
        // As prost reads them: zigzag for sint64, any non-zero for bool.
        let sint64 = ((raw >> 1) as i64) ^ (-((raw & 1) as i64));
        let kind = match field {
            VALUE_INT => Some(Kind::Int(sint64)),
            VALUE_TIMESTAMP => Some(Kind::Timestamp(sint64)),
            VALUE_TIMESTAMPTZ => Some(Kind::Timestamptz(sint64)),
            VALUE_BOOL => Some(Kind::Bool(raw != 0)),
            _ => None,
        };
        if let Some(kind) = kind {
            value.kind = Some(kind);
            return Ok(());
        }
    }
    pos = 0;
    if let Ok((field, LEN)) = read_key(bytes, &mut pos)
        && let Ok(range) = read_field(bytes, &mut pos, LEN)
        && pos == bytes.len()
    {
        let payload = &bytes[range];
        match field {
            VALUE_NULL if payload.is_empty() => {
                value.kind = Some(Kind::Null(v1::Null {}));
                return Ok(());
            }
            VALUE_NUMERIC | VALUE_TEXT | VALUE_JSON => {
                let text = std::str::from_utf8(payload)
                    .map_err(|_| DecodeError::Wire("a string value is not UTF-8"))?;
                match (&mut value.kind, field) {
                    (Some(Kind::Numeric(s)), VALUE_NUMERIC)
                    | (Some(Kind::Text(s)), VALUE_TEXT)
                    | (Some(Kind::Json(s)), VALUE_JSON) => {
                        s.clear();
                        s.push_str(text);
                    }
                    _ => {
                        let text = text.to_owned();
                        value.kind = Some(match field {
                            VALUE_NUMERIC => Kind::Numeric(text),
                            VALUE_TEXT => Kind::Text(text),
                            _ => Kind::Json(text),
                        });
                    }
                }
                return Ok(());
            }
            VALUE_BYTES | VALUE_UUID => {
                match (&mut value.kind, field) {
                    (Some(Kind::Bytes(b)), VALUE_BYTES) | (Some(Kind::Uuid(b)), VALUE_UUID) => {
                        b.clear();
                        b.extend_from_slice(payload);
                    }
                    _ => {
                        let bytes = payload.to_vec();
                        value.kind = Some(if field == VALUE_BYTES {
                            Kind::Bytes(bytes)
                        } else {
                            Kind::Uuid(bytes)
                        });
                    }
                }
                return Ok(());
            }
            _ => {}
        }
    }
    *value = v1::Value::decode(bytes).map_err(DecodeError::Protobuf)?;
    Ok(())
}

/// Protobuf's largest field number.
const MAX_FIELD: u32 = (1 << 29) - 1;

/// Built only when needed: an error has drop glue, and building one for
/// `ok_or` on every read showed in the loader's profile.
fn truncated() -> DecodeError {
    DecodeError::Wire("truncated field")
}

fn read_varint(bytes: &[u8], pos: &mut usize) -> Result<u64, DecodeError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*pos).ok_or_else(truncated)?;
        *pos += 1;
        if shift == 63 && byte > 1 {
            return Err(DecodeError::Wire("varint overflows 64 bits"));
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError::Wire("varint longer than 10 bytes"))
}

fn read_key(bytes: &[u8], pos: &mut usize) -> Result<(u32, u8), DecodeError> {
    let key = read_varint(bytes, pos)?;
    // No error value is built unless there is an error (see `truncated`).
    match u32::try_from(key >> 3) {
        Ok(field) if (1..=MAX_FIELD).contains(&field) => Ok((field, (key & 7) as u8)),
        _ => Err(DecodeError::Wire("invalid field number")),
    }
}

/// Skips over a field's value; returns where it is (for `LEN`, its payload).
fn read_field(bytes: &[u8], pos: &mut usize, wire: u8) -> Result<Range<usize>, DecodeError> {
    let start = *pos;
    let end = match wire {
        VARINT => {
            read_varint(bytes, pos)?;
            return Ok(start..*pos);
        }
        FIXED64 => start.checked_add(8),
        FIXED32 => start.checked_add(4),
        LEN => {
            let len = usize::try_from(read_varint(bytes, pos)?).map_err(|_| truncated())?;
            let start = *pos;
            let end = start.checked_add(len).filter(|e| *e <= bytes.len());
            let end = end.ok_or_else(truncated)?;
            *pos = end;
            return Ok(start..end);
        }
        _ => return Err(DecodeError::Wire("unsupported wire type")),
    };
    let end = end.filter(|e| *e <= bytes.len()).ok_or_else(truncated)?;
    *pos = end;
    Ok(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> v1::Value {
        v1::Value {
            kind: Some(Kind::Text(s.into())),
        }
    }

    fn package(rows: Vec<v1::Row>) -> v1::Package {
        v1::Package {
            source: "app".into(),
            schema: "public".into(),
            table: "t".into(),
            kind: v1::Kind::Changes as i32,
            commit_lsn: 42,
            first_row_ordinal: 7,
            rows,
            ..Default::default()
        }
    }

    /// Every row read back equals the row prost decodes, across rows whose
    /// values change kind and count (the reused buffers must not leak).
    #[test]
    fn rows_read_one_at_a_time_equal_the_decoded_package() {
        let value = |kind| v1::Value { kind: Some(kind) };
        let rows = vec![
            v1::Row {
                op: v1::Op::Insert as i32,
                values: vec![
                    value(Kind::Int(1)),
                    text("a fairly long first text"),
                    value(Kind::Bytes(vec![1, 2, 3])),
                ],
                old_key: vec![],
            },
            v1::Row {
                op: v1::Op::Update as i32,
                values: vec![
                    value(Kind::Int(-2)),
                    text("b"),
                    value(Kind::Null(v1::Null {})),
                    value(Kind::Numeric("12.50".into())),
                ],
                old_key: vec![value(Kind::Int(1))],
            },
            v1::Row {
                op: v1::Op::Delete as i32,
                values: vec![value(Kind::Int(3)), value(Kind::Json("{}".into()))],
                old_key: vec![],
            },
            v1::Row {
                op: v1::Op::Insert as i32,
                values: vec![
                    value(Kind::Uuid(vec![9; 16])),
                    text(""),
                    v1::Value { kind: None },
                    value(Kind::Array(v1::Array {
                        dims: vec![1],
                        elements: vec![text("x")],
                        ..Default::default()
                    })),
                ],
                old_key: vec![],
            },
            v1::Row {
                op: v1::Op::Insert as i32,
                values: vec![
                    value(Kind::Int(i64::MIN)),
                    value(Kind::Int(i64::MAX)),
                    value(Kind::Bool(true)),
                    value(Kind::Bool(false)),
                    value(Kind::Timestamp(-1)),
                    value(Kind::Timestamptz(1_700_000_000_000_000)),
                    value(Kind::Date(-3)),
                    text("after the integers"),
                ],
                old_key: vec![value(Kind::Int(0))],
            },
            v1::Row::default(),
        ];
        let original = package(rows);
        let raw = original.encode_to_vec();
        let split = split(&raw).unwrap();
        assert_eq!(
            split.header,
            v1::Package {
                rows: vec![],
                ..original.clone()
            }
        );
        assert_eq!(split.rows.len(), original.rows.len());
        let mut reader = RowReader::default();
        for (range, expected) in split.rows.iter().zip(&original.rows) {
            assert_eq!(reader.read(&raw[range.clone()]).unwrap(), expected);
        }
    }

    /// Truncated and damaged packages are errors, never panics, and a package
    /// prost rejects is never read as a different one.
    #[test]
    fn damaged_bytes_are_errors() {
        let original = package(vec![v1::Row {
            op: v1::Op::Insert as i32,
            values: vec![
                text("héllo"),
                v1::Value {
                    kind: Some(Kind::Int(-300)),
                },
                v1::Value {
                    kind: Some(Kind::Bool(true)),
                },
                v1::Value {
                    kind: Some(Kind::Null(v1::Null {})),
                },
                text("world"),
            ],
            old_key: vec![],
        }]);
        let raw = original.encode_to_vec();
        let mut reader = RowReader::default();
        let mut read_all = |bytes: &[u8]| -> Result<Vec<v1::Row>, DecodeError> {
            let split = split(bytes)?;
            split
                .rows
                .iter()
                .map(|r| reader.read(&bytes[r.clone()]).cloned())
                .collect()
        };
        for len in 0..raw.len() {
            let cut = &raw[..len];
            if let (Ok(rows), Ok(decoded)) = (read_all(cut), v1::Package::decode(cut)) {
                assert_eq!(rows, decoded.rows);
            }
        }
        for at in 0..raw.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = raw.clone();
                bad[at] ^= flip;
                if let Ok(rows) = read_all(&bad) {
                    let decoded = v1::Package::decode(bad.as_slice())
                        .expect("what the reader accepts, prost accepts");
                    assert_eq!(rows, decoded.rows);
                }
            }
        }
        // Invalid UTF-8 in a text value.
        let mut bad = raw.clone();
        let at = raw.windows(2).position(|w| w == "é".as_bytes()).unwrap();
        bad[at] = 0xff;
        assert!(read_all(&bad).is_err());
        assert!(v1::Package::decode(bad.as_slice()).is_err());
    }
}
