//! The bounded-memory comparison of one table: both sides read in the same
//! order, the MD5 of the row's key text, and merged as they arrive.
//!
//! Postgres is read through a cursor (`FETCH` of [`FETCH_ROWS`] rows) inside
//! the caller's REPEATABLE READ transaction, ClickHouse as one streamed
//! TabSeparated result ordered by the same hash. Rows that share a hash (one
//! key, or a duplicate in ClickHouse) are compared as a group; nothing else
//! is held, so memory does not grow with the table.
//!
//! The order needs the key's text to be the same on both sides: for the
//! kinds whose canonical text is the text itself (integers, text, uuid,
//! dates, timestamps both printed `YYYY-MM-DD HH:MM:SS.ffffff`, bytea as
//! hex) the text; for bool, floats, decimals and time their checksum text
//! ([`super::checksum`]: `true`/`false`, IEEE bytes, no trailing zeros,
//! microseconds). Array keys have none ([`hashable`]) and are compared in
//! memory by the caller.
//!
//! It is the second pass when [`super::checksum`] applies: only the buckets
//! whose checksums differ are read. With a sample, only the rows whose hash
//! starts with one of the chosen two-hex-digit buckets are read (both sides
//! still scan the table, but sort and send only the sample).

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};

use tokio::io::AsyncBufReadExt;

use super::canonical::{Column, ColumnKind, canonical, ch_expr, pg_expr};
use super::read::{parse_tsv_line, text_row};
use super::report::{ColumnDifference, DifferenceKind, MAX_REPORTED_DIFFERENCES};
use super::{Row, VerifyError};
use crate::clickhouse::schema::{DELETED_COLUMN, quote_ident};

/// Rows per Postgres `FETCH`.
const FETCH_ROWS: usize = 5000;

/// Names of the selected columns: in sluice's reserved `_sluice` namespace,
/// so no column of a source table is called so in ClickHouse (whose aliases
/// are visible to the other expressions of the same SELECT).
const HASH: &str = "_sluice_verify_hash";
const ALIAS: &str = "_sluice_verify_c";

/// Buckets a sample chooses from: the first two hex digits of the hash.
pub(super) const BUCKETS: usize = 256;

/// Whether a key column has a text that is the same on both sides, so that
/// both can be ordered by its hash.
pub(super) fn hashable(kind: &ColumnKind) -> bool {
    !matches!(kind, ColumnKind::Array { .. })
}

/// Whether the key text of a column is its output text (else its checksum
/// text).
fn prints_alike(kind: &ColumnKind) -> bool {
    matches!(
        kind,
        ColumnKind::Plain | ColumnKind::Date | ColumnKind::Timestamp { .. } | ColumnKind::Bytea
    )
}

/// The buckets (two hex digits) a sample of `fraction` reads: a random
/// choice each run, at least one.
pub(super) fn sample_buckets(fraction: f64) -> Vec<String> {
    let wanted = ((fraction * BUCKETS as f64).ceil() as usize).clamp(1, BUCKETS);
    let state = std::collections::hash_map::RandomState::new();
    let mut buckets: Vec<(u64, usize)> = (0..BUCKETS)
        .map(|b| {
            let mut hasher = state.build_hasher();
            hasher.write_usize(b);
            (hasher.finish(), b)
        })
        .collect();
    buckets.sort_unstable();
    let mut chosen: Vec<String> = buckets[..wanted]
        .iter()
        .map(|(_, b)| format!("{b:02x}"))
        .collect();
    chosen.sort();
    chosen
}

/// What the merge found.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) postgres_rows: u64,
    pub(super) clickhouse_rows: u64,
    pub(super) differing_keys: u64,
    /// The first [`MAX_REPORTED_DIFFERENCES`] in key order.
    pub(super) differences: BTreeMap<Row, DifferenceKind>,
}

/// Where and what to compare.
pub(super) struct Sides<'a> {
    pub(super) pg: &'a tokio_postgres::Client,
    pub(super) server_version_num: i32,
    /// `"schema"."table"` and the publication's row filter (` WHERE …` or empty).
    pub(super) pg_table: String,
    pub(super) pg_where: String,
    pub(super) ch: &'a clickhouse::Client,
    pub(super) database: &'a str,
    pub(super) target: &'a str,
    pub(super) columns: &'a [Column],
    /// Read only the rows whose key hash starts with one of these prefixes
    /// (all of the same length): a sample's buckets, or the buckets whose
    /// checksums differ.
    pub(super) buckets: Option<&'a [String]>,
}

pub(super) async fn compare(sides: &Sides<'_>) -> Result<Outcome, VerifyError> {
    let columns = sides.columns;
    let pg_context = |what: &str| format!("{what} of {}", sides.pg_table);
    let ch_context = format!("rows of {}.{}", sides.database, sides.target);

    let pg_hash = pg_key_hash(columns, sides.server_version_num);
    let pg_columns: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} AS {ALIAS}{i}", pg_expr(c, sides.server_version_num)))
        .collect();
    let names: Vec<String> = (0..columns.len()).map(|i| format!("{ALIAS}{i}")).collect();
    let pg_sql = format!(
        "DECLARE sluice_verify NO SCROLL CURSOR FOR \
         SELECT {HASH}, {} FROM (SELECT md5({pg_hash}) AS {HASH}, {} FROM {}{}) s{} \
         ORDER BY {HASH} COLLATE \"C\"",
        names.join(", "),
        pg_columns.join(", "),
        sides.pg_table,
        sides.pg_where,
        bucket_filter(sides.buckets, Side::Postgres, HASH)
    );
    sides
        .pg
        .batch_execute(&pg_sql)
        .await
        .map_err(|source| VerifyError::Postgres {
            context: pg_context("reading the rows"),
            source,
        })?;

    let ch_hash = ch_key_hash(columns);
    let ch_columns: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} AS {ALIAS}{i}", ch_expr(c)))
        .collect();
    let ch_sql = format!(
        "SELECT {HASH}, {} FROM (SELECT lower(hex(MD5(concat({ch_hash}, '')))) AS {HASH}, {} \
         FROM {}.{} FINAL WHERE {} = 0){} ORDER BY {HASH} SETTINGS session_timezone = 'UTC'",
        names.join(", "),
        ch_columns.join(", "),
        quote_ident(sides.database),
        quote_ident(sides.target),
        quote_ident(DELETED_COLUMN),
        bucket_filter(sides.buckets, Side::ClickHouse, HASH)
    );
    let cursor = sides
        .ch
        .query_raw(&ch_sql)
        .fetch_bytes("TabSeparated")
        .map_err(|source| VerifyError::ClickHouse {
            context: ch_context.clone(),
            source,
        })?;
    let mut ch_reader = ChReader {
        cursor,
        line: Vec::new(),
        context: ch_context.clone(),
    };
    let mut pg_reader = PgReader {
        pg: sides.pg,
        buffer: std::collections::VecDeque::new(),
        done: false,
        context: pg_context("reading the rows"),
    };

    let mut outcome = Outcome::default();
    let mut pg_next = pg_reader.next().await?;
    let mut ch_next = ch_reader.next(columns.len() + 1).await?;
    loop {
        let hash = match (&pg_next, &ch_next) {
            (None, None) => break,
            (Some(p), None) => p.0.clone(),
            (None, Some(c)) => c.0.clone(),
            (Some(p), Some(c)) => p.0.clone().min(c.0.clone()),
        };
        let mut pg_group: Vec<Row> = Vec::new();
        while let Some((h, row)) = pg_next.take_if(|(h, _)| *h == hash) {
            debug_assert_eq!(h, hash);
            pg_group.push(row);
            pg_next = pg_reader.next().await?;
        }
        let mut ch_group: Vec<Row> = Vec::new();
        while let Some((_, row)) = ch_next.take_if(|(h, _)| *h == hash) {
            ch_group.push(row);
            ch_next = ch_reader.next(columns.len() + 1).await?;
        }
        outcome.postgres_rows += pg_group.len() as u64;
        outcome.clickhouse_rows += ch_group.len() as u64;
        compare_group(columns, pg_group, ch_group, &mut outcome);
    }
    sides
        .pg
        .batch_execute("CLOSE sluice_verify")
        .await
        .map_err(|source| VerifyError::Postgres {
            context: pg_context("closing the cursor"),
            source,
        })?;
    Ok(outcome)
}

/// The key's text on the Postgres side, whose MD5 orders and buckets the
/// rows: the type's output text, as the loader stored it.
pub(super) fn pg_key_hash(columns: &[Column], server_version_num: i32) -> String {
    columns
        .iter()
        .filter(|c| c.key)
        .map(|c| {
            if !prints_alike(&c.kind) {
                return super::checksum::pg_text(c, server_version_num);
            }
            let e = pg_expr(c, server_version_num);
            format!(
                "CASE WHEN ({e}) IS NULL THEN '\\N' ELSE {} END",
                c.pg_output(&e)
            )
        })
        .collect::<Vec<_>>()
        .join(" || E'\\x1f' || ")
}

/// The key's text on the ClickHouse side, printed as [`pg_key_hash`].
pub(super) fn ch_key_hash(columns: &[Column]) -> String {
    columns
        .iter()
        .filter(|c| c.key)
        .map(|c| {
            if prints_alike(&c.kind) {
                format!("ifNull(toString({}), '\\\\N')", ch_expr(c))
            } else {
                super::checksum::ch_text(c)
            }
        })
        .collect::<Vec<_>>()
        .join(", '\\x1f', ")
}

#[derive(Clone, Copy)]
pub(super) enum Side {
    Postgres,
    ClickHouse,
}

/// ` WHERE <prefix of hash> IN (…)` when only some buckets are read (all of
/// the same number of hex digits), else nothing.
pub(super) fn bucket_filter(buckets: Option<&[String]>, side: Side, hash: &str) -> String {
    let Some(buckets) = buckets else {
        return String::new();
    };
    let digits = buckets.first().map_or(2, String::len);
    let prefix = match side {
        Side::Postgres => format!("left({hash}, {digits})"),
        Side::ClickHouse => format!("substring({hash}, 1, {digits})"),
    };
    let list = buckets
        .iter()
        .map(|b| format!("'{b}'"))
        .collect::<Vec<_>>()
        .join(", ");
    // An empty choice reads nothing.
    if list.is_empty() {
        return " WHERE false".into();
    }
    format!(" WHERE {prefix} IN ({list})")
}

/// Splits a canonical row into its key and the row.
fn split(columns: &[Column], row: Row) -> (Row, Row) {
    let key = columns
        .iter()
        .zip(&row)
        .filter(|(c, _)| c.key)
        .map(|(_, v)| v.clone())
        .collect();
    (key, row)
}

/// Compares the rows of one hash (raw text, without the hash column), or of
/// a whole table.
pub(super) fn compare_group(columns: &[Column], pg: Vec<Row>, ch: Vec<Row>, outcome: &mut Outcome) {
    let mut expected: BTreeMap<Row, Row> = BTreeMap::new();
    for raw in pg {
        let values: Row = columns
            .iter()
            .zip(&raw)
            .map(|(c, v)| canonical(&c.kind, v.as_deref(), true))
            .collect();
        let (key, values) = split(columns, values);
        expected.insert(key, values);
    }
    let mut seen: BTreeMap<Row, ()> = BTreeMap::new();
    let mut differing: BTreeMap<Row, DifferenceKind> = BTreeMap::new();
    for raw in ch {
        let values: Row = columns
            .iter()
            .zip(&raw)
            .map(|(c, v)| {
                if c.missing {
                    None
                } else {
                    canonical(&c.kind, v.as_deref(), false)
                }
            })
            .collect();
        let (key, values) = split(columns, values);
        if seen.insert(key.clone(), ()).is_some() {
            differing.insert(key, DifferenceKind::DuplicateInClickHouse);
            continue;
        }
        match expected.remove(&key) {
            None => {
                differing.insert(key, DifferenceKind::OnlyInClickHouse);
            }
            Some(want) if want != values => {
                let cols = columns
                    .iter()
                    .zip(want.into_iter().zip(values))
                    .filter(|(_, (p, c))| p != c)
                    .map(|(column, (p, c))| ColumnDifference {
                        column: column.name.clone(),
                        postgres: p,
                        clickhouse: c,
                    })
                    .collect();
                differing.insert(key, DifferenceKind::Values(cols));
            }
            Some(_) => {}
        }
    }
    for key in expected.into_keys() {
        differing.insert(key, DifferenceKind::OnlyInPostgres);
    }
    for (key, kind) in differing {
        outcome.differing_keys += 1;
        outcome.differences.insert(key, kind);
        if outcome.differences.len() > MAX_REPORTED_DIFFERENCES {
            outcome.differences.pop_last();
        }
    }
}

/// Postgres rows from the cursor, a `FETCH` at a time.
struct PgReader<'a> {
    pg: &'a tokio_postgres::Client,
    buffer: std::collections::VecDeque<(String, Row)>,
    done: bool,
    context: String,
}

impl PgReader<'_> {
    async fn next(&mut self) -> Result<Option<(String, Row)>, VerifyError> {
        if self.buffer.is_empty() && !self.done {
            let messages = self
                .pg
                .simple_query(&format!("FETCH {FETCH_ROWS} FROM sluice_verify"))
                .await
                .map_err(|source| VerifyError::Postgres {
                    context: self.context.clone(),
                    source,
                })?;
            for message in messages {
                if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                    let mut values = text_row(&row);
                    let hash = values.remove(0).unwrap_or_default();
                    self.buffer.push_back((hash, values));
                }
            }
            self.done = self.buffer.len() < FETCH_ROWS;
        }
        Ok(self.buffer.pop_front())
    }
}

/// ClickHouse rows from the streamed TabSeparated result, a line at a time.
struct ChReader {
    cursor: clickhouse::query::BytesCursor,
    line: Vec<u8>,
    context: String,
}

impl ChReader {
    async fn next(&mut self, fields: usize) -> Result<Option<(String, Row)>, VerifyError> {
        self.line.clear();
        let read = self
            .cursor
            .read_until(b'\n', &mut self.line)
            .await
            .map_err(|_| VerifyError::Malformed {
                context: self.context.clone(),
            })?;
        if read == 0 {
            return Ok(None);
        }
        let mut row = parse_tsv_line(&self.line)
            .filter(|row| row.len() == fields)
            .ok_or_else(|| VerifyError::Malformed {
                context: self.context.clone(),
            })?;
        let hash = row.remove(0).unwrap_or_default();
        Ok(Some((hash, row)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_a_sorted_set_of_distinct_buckets() {
        let tenth = sample_buckets(0.1);
        assert_eq!(tenth.len(), 26);
        let mut distinct = tenth.clone();
        distinct.dedup();
        assert_eq!(distinct, tenth);
        assert!(tenth.iter().all(|b| b.len() == 2));
        assert_eq!(sample_buckets(0.0).len(), 1);
        assert_eq!(sample_buckets(1.0).len(), 256);
    }

    #[test]
    fn keys_of_every_kind_but_arrays_are_ordered_by_hash() {
        assert!(hashable(&ColumnKind::Plain));
        assert!(hashable(&ColumnKind::Bytea));
        assert!(hashable(&ColumnKind::Bool));
        assert!(hashable(&ColumnKind::Float64));
        assert!(hashable(&ColumnKind::Time));
        assert!(!hashable(&ColumnKind::Array { depth: 1 }));
        assert!(prints_alike(&ColumnKind::Date));
        assert!(!prints_alike(&ColumnKind::Float32));
    }
}
