//! Checksums computed inside each server, per bucket of keys: the first pass
//! of the bounded-memory comparison ([`super::merge`]), so that only the
//! buckets whose checksums differ are read and compared value by value.
//!
//! A bucket is the first [`DIGITS`] hex digits of the MD5 of the row's key
//! text, the hash [`super::merge`] orders by (4,096 buckets; a sample's
//! two-digit buckets hold 16 each). Per bucket, both servers return the
//! number of rows and the exact sum of a 64-bit hash of each row: the first
//! 8 bytes of the MD5 of the row's *checksum text*, read as a signed
//! big-endian integer, summed as `numeric` in Postgres and `Int128` in
//! ClickHouse, so the sum is order-independent and does not wrap.
//!
//! The checksum text of a row joins its columns' texts with `\x1f`; a NULL
//! is `\N`. Each column's text is one both servers print alike for equal
//! data, as the value-by-value comparison canonicalises it:
//!
//! - the kinds whose canonical text is the text itself (text, json, inet,
//!   ...) as `<bytes>:<text>`, so a value holding `\x1f` or `\N` cannot
//!   shift into its neighbour; integers and uuids, which hold neither, as
//!   they print;
//! - dates, timestamps (clamped like the loader clamps) and bytea (hex) as
//!   the comparison reads them;
//! - `bool` as `true`/`false`;
//! - floats as the hex of their IEEE bytes (Postgres `float8send`), which
//!   no decimal printing can blur (`-0` as `0`);
//! - decimals without trailing zeros (`trim_scale`, Postgres 13+; ClickHouse
//!   prints no trailing zeros);
//! - `time` padded to microseconds.
//!
//! Arrays (compared as JSON trees) have no such text: a table with an array
//! column, or with a column missing in ClickHouse, is compared value by
//! value throughout ([`eligible`]).
//!
//! What can go wrong is one-sided. If both servers printed equal data
//! differently, the bucket would differ and be compared value by value,
//! which decides; it only costs time. Unequal data with equal checksums
//! needs a 64-bit hash collision in the bucket.

use std::collections::BTreeMap;

use super::VerifyError;
use super::canonical::{Column, ColumnKind, ch_expr, pg_expr};
use super::merge::{Side, Sides, bucket_filter, ch_key_hash, pg_key_hash};
use super::read::{clickhouse_rows, text_row};
use crate::clickhouse::schema::{DELETED_COLUMN, quote_ident};

/// Hex digits of the key hash that name a bucket: 4,096 buckets.
pub(super) const DIGITS: usize = 3;

/// Whether every column of the table has a checksum text.
pub(super) fn eligible(columns: &[Column]) -> bool {
    columns
        .iter()
        .all(|c| !c.missing && !matches!(c.kind, ColumnKind::Array { .. }))
}

/// Rows and hash sum of one bucket on one side.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Bucket {
    rows: u64,
    sum: String,
}

/// What the checksums found.
#[derive(Debug, Default)]
pub(super) struct Summary {
    pub(super) postgres_rows: u64,
    pub(super) clickhouse_rows: u64,
    /// Buckets holding rows on either side.
    pub(super) buckets: u64,
    /// Buckets whose count or sum differ, sorted.
    pub(super) differing: Vec<String>,
    /// Rows of the buckets that are equal (on each side).
    pub(super) equal_rows: u64,
}

/// The checksum text of one column on the Postgres side (also the key text
/// of the kinds whose output differs between the servers).
pub(super) fn pg_text(column: &Column, server_version_num: i32) -> String {
    let e = pg_expr(column, server_version_num);
    let text = match column.kind {
        ColumnKind::Plain if column.is_token() => column.pg_output(&e),
        ColumnKind::Plain => {
            let t = column.pg_output(&e);
            format!("octet_length({t})::text || ':' || {t}")
        }
        ColumnKind::Date => format!("format('%s', {e})"),
        // Already text (`to_char`, `encode`).
        ColumnKind::Timestamp { .. } | ColumnKind::Bytea => e.clone(),
        ColumnKind::Bool => format!("CASE WHEN {e} THEN 'true' ELSE 'false' END"),
        // `-0` as `0`: equal values (and keys).
        ColumnKind::Float32 => {
            format!(
                "encode(float4send(CASE WHEN {e} = 0 THEN 0::float4 ELSE ({e})::float4 END), 'hex')"
            )
        }
        ColumnKind::Float64 => {
            format!(
                "encode(float8send(CASE WHEN {e} = 0 THEN 0::float8 ELSE ({e})::float8 END), 'hex')"
            )
        }
        ColumnKind::Decimal { .. } => format!("trim_scale({e})::text"),
        ColumnKind::Time => format!("to_char(({e})::interval, 'HH24:MI:SS.US')"),
        // Not eligible; never asked for.
        ColumnKind::Array { .. } => format!("({e})::text"),
    };
    format!("CASE WHEN ({e}) IS NULL THEN '\\N' ELSE {text} END")
}

/// The checksum text of one column on the ClickHouse side.
pub(super) fn ch_text(column: &Column) -> String {
    let e = ch_expr(column);
    let x = format!("assumeNotNull({e})");
    let text = match column.kind {
        ColumnKind::Plain if column.is_token() => format!("toString({x})"),
        ColumnKind::Plain => {
            format!("concat(toString(length(toString({x}))), ':', toString({x}))")
        }
        ColumnKind::Float32 => {
            format!("lower(hex(reverse(reinterpretAsFixedString(toFloat32(if({x} = 0, 0, {x}))))))")
        }
        ColumnKind::Float64 => {
            format!("lower(hex(reverse(reinterpretAsFixedString(toFloat64(if({x} = 0, 0, {x}))))))")
        }
        _ => format!("toString({x})"),
    };
    format!("if(isNull({e}), '\\\\N', {text})")
}

/// Counts and hash sums per bucket on both sides (at once), and the buckets
/// that differ. Reads only the sample's buckets when `sides` has one.
pub(super) async fn compare(sides: &Sides<'_>) -> Result<Summary, VerifyError> {
    let columns = sides.columns;
    let pg_row = columns
        .iter()
        .map(|c| pg_text(c, sides.server_version_num))
        .collect::<Vec<_>>()
        .join(" || E'\\x1f' || ");
    // Grouped through a join with the bucket numbers, so that the planner
    // knows there are at most 4,096 groups: a hash aggregate of a few kB
    // instead of sorting the whole table (with a merge join it would sort
    // again, hence `enable_mergejoin` off for this one query).
    let pg_sql = format!(
        "SET LOCAL enable_mergejoin = off; \
         SELECT g.name, count(*), sum(('x' || left(s.r, 16))::bit(64)::bigint)::text \
         FROM (SELECT ('x' || left(md5({}), {DIGITS}))::bit({bits})::int AS b, md5({pg_row}) AS r \
         FROM {}{}) s \
         JOIN (SELECT b, lpad(to_hex(b), {DIGITS}, '0') AS name \
         FROM generate_series(0, {last}) b) g ON g.b = s.b{} GROUP BY g.name; \
         SET LOCAL enable_mergejoin TO DEFAULT",
        pg_key_hash(columns, sides.server_version_num),
        sides.pg_table,
        sides.pg_where,
        bucket_filter(sides.buckets, Side::Postgres, "g.name"),
        bits = 4 * DIGITS,
        last = 16_u32.pow(DIGITS as u32) - 1,
    );
    let ch_row = columns
        .iter()
        .map(ch_text)
        .collect::<Vec<_>>()
        .join(", '\\x1f', ");
    let ch_sql = format!(
        "SELECT substring(k, 1, {DIGITS}) AS b, count(), \
         toString(sum(toInt128(reinterpretAsInt64(reverse(substring(MD5(r), 1, 8)))))) \
         FROM (SELECT lower(hex(MD5(concat({}, '')))) AS k, concat({ch_row}, '') AS r \
         FROM {}.{} FINAL WHERE {} = 0){} GROUP BY b SETTINGS session_timezone = 'UTC'",
        ch_key_hash(columns),
        quote_ident(sides.database),
        quote_ident(sides.target),
        quote_ident(DELETED_COLUMN),
        bucket_filter(sides.buckets, Side::ClickHouse, "k"),
    );
    let pg_context = format!("checksums of {}", sides.pg_table);
    let ch_context = format!("checksums of {}.{}", sides.database, sides.target);
    let pg = async {
        let messages =
            sides
                .pg
                .simple_query(&pg_sql)
                .await
                .map_err(|source| VerifyError::Postgres {
                    context: pg_context.clone(),
                    source,
                })?;
        let rows: Vec<Vec<Option<String>>> = messages
            .into_iter()
            .filter_map(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(text_row(&row)),
                _ => None,
            })
            .collect();
        buckets(rows, &pg_context)
    };
    let ch = async {
        let rows = clickhouse_rows(sides.ch, &ch_sql, &ch_context).await?;
        buckets(rows, &ch_context)
    };
    let (pg, ch) = tokio::try_join!(pg, ch)?;
    Ok(summarise(&pg, &ch))
}

/// `bucket, rows, sum` rows into a map.
fn buckets(
    rows: Vec<Vec<Option<String>>>,
    context: &str,
) -> Result<BTreeMap<String, Bucket>, VerifyError> {
    let malformed = || VerifyError::Malformed {
        context: context.to_owned(),
    };
    rows.into_iter()
        .map(|row| match <[Option<String>; 3]>::try_from(row) {
            Ok([Some(bucket), Some(rows), Some(sum)]) => Ok((
                bucket,
                Bucket {
                    rows: rows.parse().map_err(|_| malformed())?,
                    sum,
                },
            )),
            _ => Err(malformed()),
        })
        .collect()
}

fn summarise(pg: &BTreeMap<String, Bucket>, ch: &BTreeMap<String, Bucket>) -> Summary {
    let mut summary = Summary {
        postgres_rows: pg.values().map(|b| b.rows).sum(),
        clickhouse_rows: ch.values().map(|b| b.rows).sum(),
        ..Summary::default()
    };
    let names: std::collections::BTreeSet<&String> = pg.keys().chain(ch.keys()).collect();
    summary.buckets = names.len() as u64;
    summary.differing = names
        .into_iter()
        .filter(|name| pg.get(*name) != ch.get(*name))
        .cloned()
        .collect();
    summary.equal_rows = pg
        .iter()
        .filter(|(name, bucket)| ch.get(*name) == Some(*bucket))
        .map(|(_, bucket)| bucket.rows)
        .sum();
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(kind: ColumnKind) -> Column {
        Column {
            name: "c".into(),
            ch_name: "c".into(),
            kind,
            key: false,
            missing: false,
            pg_type: "text".into(),
        }
    }

    #[test]
    fn tables_with_arrays_or_missing_columns_are_not_checksummed() {
        assert!(eligible(&[
            column(ColumnKind::Plain),
            column(ColumnKind::Float64),
            column(ColumnKind::Time),
        ]));
        assert!(!eligible(&[
            column(ColumnKind::Plain),
            column(ColumnKind::Array { depth: 1 })
        ]));
        let mut missing = column(ColumnKind::Plain);
        missing.missing = true;
        assert!(!eligible(&[missing]));
    }

    #[test]
    fn a_bucket_differs_by_count_by_sum_or_by_being_on_one_side() {
        let bucket = |rows, sum: &str| Bucket {
            rows,
            sum: sum.into(),
        };
        let pg = BTreeMap::from([
            ("000".to_owned(), bucket(2, "10")),
            ("001".to_owned(), bucket(1, "-5")),
            ("002".to_owned(), bucket(3, "7")),
            ("003".to_owned(), bucket(1, "1")),
        ]);
        let ch = BTreeMap::from([
            ("000".to_owned(), bucket(2, "10")),
            ("001".to_owned(), bucket(1, "-6")),
            ("002".to_owned(), bucket(2, "7")),
            ("004".to_owned(), bucket(1, "1")),
        ]);
        let summary = summarise(&pg, &ch);
        assert_eq!(summary.differing, ["001", "002", "003", "004"]);
        assert_eq!(summary.buckets, 5);
        assert_eq!((summary.postgres_rows, summary.clickhouse_rows), (7, 6));
        assert_eq!(summary.equal_rows, 2);
    }

    #[test]
    fn texts_mark_nulls_and_delimit_plain_values() {
        let plain = pg_text(&column(ColumnKind::Plain), 150000);
        assert!(
            plain.starts_with("CASE WHEN (\"c\") IS NULL THEN '\\N'"),
            "{plain}"
        );
        assert!(
            plain.contains("octet_length((\"c\")::text)::text || ':'"),
            "{plain}"
        );
        let plain = ch_text(&column(ColumnKind::Plain));
        assert!(plain.starts_with("if(isNull(`c`), '\\\\N'"), "{plain}");
        assert!(
            plain.contains("length(toString(assumeNotNull(`c`)))"),
            "{plain}"
        );
        // An integer holds no separator: as it prints.
        let mut id = column(ColumnKind::Plain);
        id.pg_type = "int8".into();
        assert_eq!(
            pg_text(&id, 150000),
            "CASE WHEN (\"c\") IS NULL THEN '\\N' ELSE (\"c\")::text END"
        );
        assert_eq!(
            ch_text(&id),
            "if(isNull(`c`), '\\\\N', toString(assumeNotNull(`c`)))"
        );
        // A char(n) keeps its padding: not a `::text` cast.
        let mut padded = column(ColumnKind::Plain);
        padded.pg_type = "bpchar".into();
        assert!(pg_text(&padded, 150000).contains("format('%s', \"c\")"));
    }
}
