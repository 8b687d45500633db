//! `sluice-loader verify`: compares each published Postgres table with the
//! current state of its ClickHouse target (`FINAL`, deleted rows excluded).
//!
//! Both sides are read as text, one canonical string per value, keyed by the
//! target's sorting key (= the source's replica identity), and compared row by
//! row. "Canonical" applies the documented mapping of
//! [`crate::clickhouse::types`], so equal data compares equal and only real
//! losses show up:
//!
//! - floats are compared as IEEE values (`NaN`/`nan`, `Infinity`/`inf`);
//! - `Decimal` columns ignore trailing zeros, and Postgres' `NaN`/`±Infinity`
//!   are compared as the loader's documented clamps (0 and the largest value);
//! - `date`/`timestamp(tz)` are clamped to the `Date32`/`DateTime64` range on
//!   the Postgres side (the loader counts these clamps) and printed alike;
//! - `time` fractions are padded to microseconds;
//! - `bytea` is compared as lower-case hex;
//! - arrays are compared as JSON trees with scalars as text (a NULL array is
//!   the empty array, a value with fewer dimensions than the column is wrapped,
//!   as the loader stores them);
//! - `money` is compared as its numeric value (its text form is locale-bound).
//!
//! Everything else (text, enums, json, timetz, interval in ISO 8601, inet, ...)
//! must match Postgres' output text exactly, which is what the loader stores.
//!
//! The ClickHouse table and columns of a source table are found by the
//! loader's own naming rule ([`crate::clickhouse::names`]), so a renamed
//! column (`_sluice_version` → `__sluice_version`) is compared with its
//! source column.
//!
//! Each table is compared as the publication publishes it (Postgres 15+):
//! only the columns of its column list and only the rows its row filter
//! admits (`pg_publication_tables.attnames`, `rowfilter`).
//!
//! Postgres is read inside one REPEATABLE READ transaction for all tables.
//! A table is compared in bounded memory, in two passes: [`checksum`] has each server sum a hash of
//! every row per bucket of key hashes (nothing but 4,096 small rows comes
//! back), then [`merge`] reads only the buckets whose checksums differ, both
//! sides ordered by the MD5 of the key and merged as they stream, down to the
//! differing keys. A table with an array column skips the first pass.
//! The key's text is the same on both sides: its output text where both
//! servers print it alike (integers, text, uuid, dates, timestamps, bytea),
//! else its checksum text (bool, floats, decimals, time). `--sample
//! FRACTION` reads only a random share of the hash buckets. Array keys (or
//! a REPLICA IDENTITY FULL table with an array column) are compared with the
//! table's Postgres rows held in memory, and always whole.
//!
//! This module runs the comparison; `canonical` owns the per-column read
//! expressions and canonical forms, `checksum` the in-server checksums,
//! `merge` the streamed comparison, `read` the two connections, and `report`
//! the result and its text.

mod canonical;
mod checksum;
mod merge;
mod read;
mod report;

use std::collections::BTreeMap;

use sluice_broker::TableName;
use sluice_broker::config::Config;
use sluice_postgres::publication::PublishedView;

use crate::clickhouse::names::{target_column_name, target_table_name};
use crate::clickhouse::schema::{DELETED_COLUMN, quote_ident};
use canonical::{Column, ch_expr, classify, pg_expr};
use read::{clickhouse_client, clickhouse_rows, connect_postgres, text_row};
pub use report::{
    Checksums, ColumnDifference, Difference, DifferenceKind, MAX_REPORTED_DIFFERENCES, TableReport,
};

/// Verification could not run (as opposed to: it ran and found differences).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("clickhouse client")]
    Client(#[source] crate::clickhouse::ClientError),
    #[error("cannot connect to Postgres")]
    Connect(#[source] sluice_postgres::PgError),
    #[error("postgres: {context}")]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("clickhouse: {context}")]
    ClickHouse {
        context: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("clickhouse returned malformed output for {context}")]
    Malformed { context: String },
    #[error("table {0:?} is not `schema.table`")]
    BadTableName(String),
    #[error("publication {0:?} has no tables (or does not exist)")]
    NoTables(String),
}

/// How `verify` reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Compare only this share (0 to 1) of the keys, chosen at random by
    /// the hash of the key (tables compared by [`merge`] only).
    pub sample: Option<f64>,
}

/// Compares every table of the publication (or only `table`, `schema.table`).
pub async fn verify(config: &Config, table: Option<&str>) -> Result<Vec<TableReport>, VerifyError> {
    verify_with(config, table, Options::default()).await
}

/// [`verify`] with [`Options`].
pub async fn verify_with(
    config: &Config,
    table: Option<&str>,
    options: Options,
) -> Result<Vec<TableReport>, VerifyError> {
    let conn = connect_postgres(config).await?;
    let pg = &conn.client;
    // Every table and count from one snapshot of Postgres.
    pg.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(|source| VerifyError::Postgres {
            context: "starting a repeatable read transaction".into(),
            source,
        })?;
    // The share actually read: whole buckets.
    let sample = options.sample.map(|fraction| {
        let buckets = merge::sample_buckets(fraction);
        (buckets.len() as f64 / merge::BUCKETS as f64, buckets)
    });
    let ch = clickhouse_client(config)?;
    let database = config.clickhouse_database();
    let tables = match table {
        Some(name) => vec![split_table_name(name)?],
        None => {
            let rows = pg
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables \
                     WHERE pubname = $1 ORDER BY 1, 2",
                    &[&config.postgres.publication],
                )
                .await
                .map_err(|source| VerifyError::Postgres {
                    context: format!("listing publication {}", config.postgres.publication),
                    source,
                })?;
            let tables: Vec<TableName> = rows
                .iter()
                .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect();
            if tables.is_empty() {
                return Err(VerifyError::NoTables(config.postgres.publication.clone()));
            }
            tables
        }
    };
    let version = sluice_postgres::version::server_version_num(pg)
        .await
        .map_err(|source| VerifyError::Postgres {
            context: "reading server_version_num".into(),
            source,
        })?;
    let mut reports = Vec::with_capacity(tables.len());
    for table in tables {
        let view = published_view(pg, &config.postgres.publication, &table).await?;
        let sample = sample.as_ref().map(|(f, b)| (*f, b.as_slice()));
        reports.push(verify_table(pg, version, &ch, &database, &table, &view, sample).await?);
    }
    pg.batch_execute("COMMIT")
        .await
        .map_err(|source| VerifyError::Postgres {
            context: "ending the transaction".into(),
            source,
        })?;
    Ok(reports)
}

/// `schema.table` (or `table` in `public`) as [`TableName::parse`] reads it;
/// an empty schema or table is refused.
fn split_table_name(name: &str) -> Result<TableName, VerifyError> {
    let table = TableName::parse(name);
    if table.schema.is_empty() || table.name.is_empty() {
        return Err(VerifyError::BadTableName(name.to_owned()));
    }
    Ok(table)
}

type Row = Vec<Option<String>>;

/// What the publication publishes of `table`, read as the replicator's
/// snapshot reads it (one lookup, in `sluice_postgres`).
async fn published_view(
    pg: &tokio_postgres::Client,
    publication: &str,
    table: &TableName,
) -> Result<PublishedView, VerifyError> {
    sluice_postgres::publication::published_view(pg, publication, table)
        .await
        .map_err(|source| VerifyError::Postgres {
            context: format!("reading what {publication} publishes of {table}"),
            source,
        })
}

async fn verify_table(
    pg: &tokio_postgres::Client,
    server_version_num: i32,
    ch: &clickhouse::Client,
    database: &str,
    source: &TableName,
    view: &PublishedView,
    sample: Option<(f64, &[String])>,
) -> Result<TableReport, VerifyError> {
    let qualified = source.to_string();
    let (schema, table) = (source.schema.as_str(), source.name.as_str());
    let target = target_table_name(schema, table);
    let pg_context = |what: &str| format!("{what} of {qualified}");
    let mut pg_columns = pg
        .query(
            "SELECT a.attname::text, bt.typname::text \
             FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid \
             JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
             WHERE a.attrelid = format('%I.%I', $1::text, $2::text)::regclass \
               AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await
        .map_err(|source| VerifyError::Postgres {
            context: pg_context("reading the columns"),
            source,
        })?;
    pg_columns.retain(|row| view.publishes(&row.get::<_, String>(0)));
    let ch_context = format!("columns of {database}.{target}");
    let ch_columns = clickhouse_rows(
        ch,
        &format!(
            "SELECT name, type, is_in_sorting_key FROM system.columns \
             WHERE database = {} AND table = {} ORDER BY position",
            crate::clickhouse::schema::quote_literal(database),
            crate::clickhouse::schema::quote_literal(&target)
        ),
        &ch_context,
    )
    .await?;
    let ch_types: BTreeMap<String, (String, bool)> = ch_columns
        .into_iter()
        .filter_map(|row| match row.as_slice() {
            [Some(name), Some(ty), Some(key)] => Some((name.clone(), (ty.clone(), key == "1"))),
            _ => None,
        })
        .collect();

    let count = async || -> Result<u64, VerifyError> {
        let pg_count: i64 = pg
            .query_one(
                &format!(
                    "SELECT count(*) FROM {}{}",
                    source.quoted(),
                    view.where_clause()
                ),
                &[],
            )
            .await
            .map_err(|source| VerifyError::Postgres {
                context: pg_context("counting the rows"),
                source,
            })?
            .get(0);
        Ok(pg_count as u64)
    };
    let mut report = TableReport {
        table: qualified.clone(),
        postgres_rows: 0,
        clickhouse_rows: 0,
        differing_keys: 0,
        differences: Vec::new(),
        problem: None,
        sample: None,
        checksums: None,
    };
    if ch_types.is_empty() {
        let pg_count = count().await?;
        report.postgres_rows = pg_count;
        // The loader creates a table with its first package; an empty source
        // table may legitimately have none yet.
        if pg_count != 0 {
            report.problem = Some(format!("no clickhouse table {database}.{target}"));
        }
        return Ok(report);
    }
    let columns: Vec<Column> = pg_columns
        .iter()
        .map(|row| {
            let name: String = row.get(0);
            let ch_name = target_column_name(&name);
            let base: String = row.get(1);
            match ch_types.get(&ch_name) {
                Some((ty, key)) => Column {
                    kind: classify(ty, &base),
                    key: *key,
                    missing: false,
                    name,
                    ch_name,
                    pg_type: base,
                },
                None => Column {
                    kind: classify("", &base),
                    key: false,
                    missing: true,
                    name,
                    ch_name,
                    pg_type: base,
                },
            }
        })
        .collect();
    let missing: Vec<&str> = columns
        .iter()
        .filter(|c| c.missing)
        .map(|c| c.name.as_str())
        .collect();
    if !missing.is_empty() {
        report.problem = Some(format!(
            "columns missing in clickhouse: {}",
            missing.join(", ")
        ));
    }
    if !columns.iter().any(|c| c.key) {
        report.postgres_rows = count().await?;
        report.problem = Some("the clickhouse table has no key columns".into());
        return Ok(report);
    }
    if columns
        .iter()
        .filter(|c| c.key)
        .all(|c| merge::hashable(&c.kind))
    {
        let mut sides = merge::Sides {
            pg,
            server_version_num,
            pg_table: source.quoted(),
            pg_where: view.where_clause(),
            ch,
            database,
            target: &target,
            columns: &columns,
            buckets: sample.map(|(_, buckets)| buckets),
        };
        report.sample = sample.map(|(fraction, _)| fraction);
        if !checksum::eligible(&columns) {
            let outcome = merge::compare(&sides).await?;
            report.postgres_rows = outcome.postgres_rows;
            report.clickhouse_rows = outcome.clickhouse_rows;
            add_differences(&mut report, outcome);
            return Ok(report);
        }
        // Checksums first; then only the buckets that differ, value by value.
        let summary = checksum::compare(&sides).await?;
        report.checksums = Some(Checksums {
            buckets: summary.buckets,
            differing_buckets: summary.differing.len() as u64,
        });
        report.postgres_rows = summary.postgres_rows;
        report.clickhouse_rows = summary.clickhouse_rows;
        if summary.differing.is_empty() {
            return Ok(report);
        }
        sides.buckets = Some(&summary.differing);
        let outcome = merge::compare(&sides).await?;
        // The rows of the buckets compared again, as the second read saw them.
        report.postgres_rows = summary.equal_rows + outcome.postgres_rows;
        report.clickhouse_rows = summary.equal_rows + outcome.clickhouse_rows;
        add_differences(&mut report, outcome);
        return Ok(report);
    }
    report.postgres_rows = count().await?;

    let pg_sql = format!(
        "SELECT {} FROM {}{}",
        columns
            .iter()
            .map(|c| pg_expr(c, server_version_num))
            .collect::<Vec<_>>()
            .join(", "),
        source.quoted(),
        view.where_clause()
    );
    let messages = pg
        .simple_query(&pg_sql)
        .await
        .map_err(|source| VerifyError::Postgres {
            context: pg_context("reading the rows"),
            source,
        })?;
    let pg_rows: Vec<Row> = messages
        .into_iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(text_row(&row)),
            _ => None,
        })
        .collect();

    let ch_sql = format!(
        "SELECT {} FROM {}.{} FINAL WHERE {} = 0 SETTINGS session_timezone = 'UTC'",
        columns.iter().map(ch_expr).collect::<Vec<_>>().join(", "),
        quote_ident(database),
        quote_ident(&target),
        quote_ident(DELETED_COLUMN)
    );
    let ch_rows = clickhouse_rows(ch, &ch_sql, &format!("rows of {database}.{target}")).await?;
    if ch_rows.iter().any(|raw| raw.len() != columns.len()) {
        return Err(VerifyError::Malformed {
            context: format!("rows of {database}.{target}"),
        });
    }
    report.clickhouse_rows = ch_rows.len() as u64;
    // The whole table as one group.
    let mut outcome = merge::Outcome::default();
    merge::compare_group(&columns, pg_rows, ch_rows, &mut outcome);
    add_differences(&mut report, outcome);
    Ok(report)
}

/// The differences the comparison found, into the report.
fn add_differences(report: &mut TableReport, outcome: merge::Outcome) {
    report.differing_keys = outcome.differing_keys;
    report.differences = outcome
        .differences
        .into_iter()
        .map(|(key, kind)| Difference {
            key: format_key(&key),
            kind,
        })
        .collect();
}

fn format_key(key: &[Option<String>]) -> String {
    let parts: Vec<&str> = key.iter().map(|v| v.as_deref().unwrap_or("NULL")).collect();
    format!("({})", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_option_reads_schema_dot_table() {
        let parse = |name: &str| split_table_name(name).map_err(|e| e.to_string());
        assert_eq!(parse("sales.orders"), Ok(TableName::new("sales", "orders")));
        assert_eq!(parse("orders"), Ok(TableName::new("public", "orders")));
        for bad in ["", ".orders", "sales."] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
