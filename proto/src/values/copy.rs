//! `COPY … TO STDOUT` text format, as a snapshot package's `copy_text`
//! carries it: one line per row, each ending in a newline; fields separated
//! by tabs, `\N` for NULL, backslash escapes for the rest.
//!
//! The replicator checks only the shape of a package's lines
//! ([`check_lines`]: UTF-8, and the tabs one field per column needs) and
//! passes the bytes on; the loader decodes them
//! into rows ([`RowDecoder`], [`materialize`]) with the same value parsers
//! the replicator uses for pgoutput's text. The bytes come from the
//! database through the stream, so they are untrusted: every function here
//! returns an error rather than panic, and no error carries a value.

use super::{TypeInfo, ValueError, decode_text, null};
use crate::v1;

/// Why a line of `copy_text` could not be decoded. Names the line (1 for
/// the package's first) and the column, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    #[error("line {line} of the COPY text is malformed: {reason}")]
    Malformed { line: u64, reason: &'static str },
    #[error("line {line} of the COPY text, column {column}: {source}")]
    Value {
        line: u64,
        column: String,
        #[source]
        source: ValueError,
    },
    #[error("the package's relation does not say how column {column} decodes")]
    NoCategory { column: String },
    #[error("the package says it holds {stated} rows of COPY text but holds {found}")]
    RowCount { stated: u64, found: u64 },
}

/// Checks the lines of `text` (each ending in a newline) over the whole text
/// at once, which is cheaper per row than line by line: valid UTF-8, and as
/// many tabs as the lines need for `columns` fields each. (So a line with a
/// field too many and another with one too few pass; the loader decodes each
/// line and refuses them.) On failure, the number of the first line that is
/// not [`well_formed`] (1 for the first).
pub fn check_lines(text: &[u8], columns: usize) -> Result<(), u64> {
    let lines = memchr::memchr_iter(b'\n', text).count();
    let tabs = memchr::memchr_iter(b'\t', text).count();
    if text.last().is_none_or(|&b| b == b'\n')
        && Some(tabs) == lines.checked_mul(columns.saturating_sub(1))
        && columns > 0
        && std::str::from_utf8(text).is_ok()
    {
        return Ok(());
    }
    // Newlines are ASCII, so a text that is not UTF-8 has a line that is not.
    let mut number = 0u64;
    for line in text.split_inclusive(|&b| b == b'\n') {
        number += 1;
        match line.strip_suffix(b"\n") {
            Some(line) if well_formed(line, columns) => {}
            _ => return Err(number),
        }
    }
    Err(number.max(1))
}

/// Whether `line` (without its newline) is valid UTF-8 with exactly
/// `columns` tab-separated fields: what the replicator checks before it
/// passes a line on.
pub fn well_formed(line: &[u8], columns: usize) -> bool {
    memchr::memchr_iter(b'\t', line).count() + 1 == columns && std::str::from_utf8(line).is_ok()
}

/// Decodes `copy_text` one line at a time into a reused [`v1::Row`].
#[derive(Debug)]
pub struct RowDecoder {
    types: Vec<TypeInfo>,
    names: Vec<String>,
    row: v1::Row,
}

impl RowDecoder {
    /// A decoder for the columns of `relation`; fails when a column does not
    /// say how it decodes.
    pub fn new(relation: &v1::Relation) -> Result<RowDecoder, CopyError> {
        let types = relation
            .columns
            .iter()
            .map(|column| {
                TypeInfo::from_column(column).ok_or_else(|| CopyError::NoCategory {
                    column: column.name.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RowDecoder {
            names: relation.columns.iter().map(|c| c.name.clone()).collect(),
            types,
            row: v1::Row {
                op: v1::Op::Insert as i32,
                values: Vec::new(),
                old_key: Vec::new(),
            },
        })
    }

    /// Decodes every line of `text`, handing each row to `each` (which may
    /// stop early by returning an error of its own). Returns the number of
    /// lines.
    pub fn for_each<E: From<CopyError>>(
        &mut self,
        text: &[u8],
        mut each: impl FnMut(&v1::Row) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut line_no = 0u64;
        let mut rest = text;
        while !rest.is_empty() {
            line_no += 1;
            let Some(end) = memchr::memchr(b'\n', rest) else {
                return Err(CopyError::Malformed {
                    line: line_no,
                    reason: "the last line has no newline",
                }
                .into());
            };
            self.decode(&rest[..end], line_no)?;
            each(&self.row)?;
            rest = &rest[end + 1..];
        }
        Ok(line_no)
    }

    fn decode(&mut self, line: &[u8], line_no: u64) -> Result<(), CopyError> {
        let malformed = |reason| CopyError::Malformed {
            line: line_no,
            reason,
        };
        let line = std::str::from_utf8(line).map_err(|_| malformed("not UTF-8"))?;
        self.row.values.clear();
        for (i, field) in line.split('\t').enumerate() {
            let ty = self
                .types
                .get(i)
                .ok_or_else(|| malformed("more fields than columns"))?;
            let decoded = if field == "\\N" {
                Ok(null())
            } else if field.contains('\\') {
                let text = unescape_field(field.as_bytes())
                    .ok_or_else(|| malformed("a bad backslash escape"))?;
                decode_text(ty, &text)
            } else {
                decode_text(ty, field)
            };
            let value = decoded.map_err(|source| CopyError::Value {
                line: line_no,
                column: self.names[i].clone(),
                source,
            })?;
            self.row.values.push(value);
        }
        if self.row.values.len() != self.types.len() {
            return Err(malformed("fewer fields than columns"));
        }
        Ok(())
    }
}

/// Replaces a package's `copy_text` by the rows it holds (a package without
/// `copy_text` is left as it is), checking `copy_rows`.
pub fn materialize(package: &mut v1::Package) -> Result<(), CopyError> {
    if package.copy_text.is_empty() && package.copy_rows == 0 {
        return Ok(());
    }
    let relation = package.relation.clone().unwrap_or_default();
    let mut decoder = RowDecoder::new(&relation)?;
    // `copy_rows` is untrusted: every line takes at least its newline.
    let mut rows = Vec::with_capacity((package.copy_rows as usize).min(package.copy_text.len()));
    let found = decoder.for_each(&package.copy_text, |row| {
        rows.push(row.clone());
        Ok::<(), CopyError>(())
    })?;
    if found != u64::from(package.copy_rows) {
        return Err(CopyError::RowCount {
            stated: package.copy_rows.into(),
            found,
        });
    }
    package.rows.extend(rows);
    package.copy_text = Default::default();
    package.copy_rows = 0;
    Ok(())
}

/// The number of rows a package holds, as rows or as `copy_text`.
pub fn row_count(package: &v1::Package) -> u64 {
    package.rows.len() as u64 + u64::from(package.copy_rows)
}

/// One field of `COPY … TO STDOUT` text format, its backslash escapes
/// resolved. `None` for a dangling backslash or text that is not UTF-8.
pub fn unescape_field(raw: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let next = *raw.get(i + 1)?;
        i += 2;
        match next {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut value = u32::from(next - b'0');
                let mut digits = 1;
                while digits < 3 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
                    value = value * 8 + u32::from(raw[i] - b'0');
                    i += 1;
                    digits += 1;
                }
                out.push((value & 0xff) as u8);
            }
            b'x' => {
                let mut value = 0u32;
                let mut digits = 0;
                while digits < 2 && i < raw.len() && raw[i].is_ascii_hexdigit() {
                    value = value * 16 + char::from(raw[i]).to_digit(16)?;
                    i += 1;
                    digits += 1;
                }
                if digits == 0 {
                    return None;
                }
                out.push(value as u8);
            }
            other => out.push(other),
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::value::Kind;
    use crate::values::TypeCategory;

    fn column(name: &str, category: TypeCategory, delimiter: u32) -> v1::Column {
        v1::Column {
            name: name.into(),
            type_name: name.into(),
            text_category: category.to_wire() as i32,
            array_delimiter: delimiter,
            ..Default::default()
        }
    }

    fn relation() -> v1::Relation {
        v1::Relation {
            columns: vec![
                column("id", TypeCategory::Int, 0),
                column("note", TypeCategory::Text, 0),
                column("tags", TypeCategory::Int, u32::from(b',')),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn copy_text_format_is_unescaped() {
        assert_eq!(unescape_field(b"a\\tb\\nc\\\\d").unwrap(), "a\tb\nc\\d");
        assert_eq!(unescape_field(b"\\101\\x41\\q").unwrap(), "AAq");
        assert_eq!(unescape_field(b"dangling\\"), None);
        assert_eq!(unescape_field(b"\\xZZ"), None);
        assert_eq!(unescape_field(b"\\377"), None, "not UTF-8");
    }

    #[test]
    fn a_package_of_copy_text_becomes_its_rows() {
        let mut package = v1::Package {
            relation: Some(relation()),
            copy_text: b"1\tone\\ttab\t{1,2}\n2\t\\N\t\\N\n".to_vec().into(),
            copy_rows: 2,
            ..Default::default()
        };
        assert_eq!(row_count(&package), 2);
        materialize(&mut package).unwrap();
        assert!(package.copy_text.is_empty());
        assert_eq!(row_count(&package), 2);
        let kinds: Vec<Vec<Option<Kind>>> = package
            .rows
            .iter()
            .map(|r| r.values.iter().map(|v| v.kind.clone()).collect())
            .collect();
        assert_eq!(kinds[0][0], Some(Kind::Int(1)));
        assert_eq!(kinds[0][1], Some(Kind::Text("one\ttab".into())));
        assert!(matches!(&kinds[0][2], Some(Kind::Array(a)) if a.elements.len() == 2));
        assert_eq!(kinds[1][1], null().kind);
        assert_eq!(kinds[1][2], null().kind);
        assert!(package.rows.iter().all(|r| r.op == v1::Op::Insert as i32));
    }

    #[test]
    fn bad_copy_text_is_refused_without_its_values() {
        let cases: [(&[u8], u32); 6] = [
            (b"1\tone\n", 1),                 // a field missing
            (b"1\tone\t{}\textra\n", 1),      // a field too many
            (b"1\tone\t{}", 1),               // no newline
            (b"x-secret\tone\t{}\n", 1),      // not an integer
            (b"1\tone\\\t{}\n", 1),           // dangling backslash
            (b"1\tone\t{}\n2\ttwo\t{}\n", 1), // more rows than stated
        ];
        for (text, rows) in cases {
            let mut package = v1::Package {
                relation: Some(relation()),
                copy_text: text.to_vec().into(),
                copy_rows: rows,
                ..Default::default()
            };
            let error = materialize(&mut package).unwrap_err();
            assert!(!error.to_string().contains("secret"), "{error}");
        }
        let mut unknown = v1::Package {
            relation: Some(v1::Relation {
                columns: vec![v1::Column {
                    name: "id".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            copy_text: b"1\n".to_vec().into(),
            copy_rows: 1,
            ..Default::default()
        };
        assert!(matches!(
            materialize(&mut unknown),
            Err(CopyError::NoCategory { .. })
        ));
    }

    #[test]
    fn lines_are_checked_together_and_the_first_bad_one_named() {
        assert_eq!(check_lines(b"1\ta\n2\tb\n", 2), Ok(()));
        assert_eq!(check_lines(b"", 2), Ok(()));
        assert_eq!(check_lines(b"1\ta\n2\tb\tc\n3\ta\n", 2), Err(2));
        // Counted over the whole text: a field too many in one line and one
        // too few in another pass here (the loader, decoding each line,
        // refuses them).
        assert_eq!(check_lines(b"1\ta\tb\n2\n", 2), Ok(()));
        assert_eq!(check_lines(b"1\ta\n2\t\xff\n", 2), Err(2));
        assert_eq!(check_lines(b"1\ta\n2\tb", 2), Err(2), "no newline");
        assert_eq!(check_lines(b"1\n", 0), Err(1));
    }

    /// Never panics, whatever the text and the stated row count (a cheap
    /// deterministic fuzz; `fuzz/fuzz_targets/copy.rs` is the real one).
    #[test]
    fn arbitrary_copy_text_never_panics() {
        let alphabet: &[u8] = b"\t\n\\N{}\",0123456789.-:x \xc3\xa9\xff";
        let mut next = crate::values::xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let len = (next() % 48) as usize;
            let text: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let _ = check_lines(&text, 3);
            let mut package = v1::Package {
                relation: Some(relation()),
                copy_text: text.into(),
                copy_rows: (next() % 4) as u32,
                ..Default::default()
            };
            if let Err(error) = materialize(&mut package) {
                let _ = error.to_string();
            }
        }
    }

    #[test]
    fn a_line_is_well_formed_with_one_field_per_column_in_utf8() {
        assert!(well_formed(b"1\ttwo\t\\N", 3));
        assert!(!well_formed(b"1\ttwo", 3));
        assert!(!well_formed(b"1\ttwo\t\xff", 3));
        assert!(well_formed(b"", 1));
    }
}
