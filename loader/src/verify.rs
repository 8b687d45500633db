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
//! The comparison holds one table's Postgres rows in memory: fine for tests
//! and moderate tables; chunking by key range is future work.

use std::collections::BTreeMap;
use std::fmt;

use secrecy::ExposeSecret;
use sluice_broker::config::{Config, read_secret};

use crate::clickhouse::schema::{DELETED_COLUMN, quote_ident, target_table_name};

/// At most this many differing keys are kept per table.
pub const MAX_REPORTED_DIFFERENCES: usize = 10;

/// Verification could not run (as opposed to: it ran and found differences).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read a password file")]
    PasswordFile(#[source] std::io::Error),
    #[error("invalid `postgres.url`")]
    PostgresUrl(#[source] tokio_postgres::Error),
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

/// One value mismatch inside a row present on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDifference {
    pub column: String,
    /// Canonical Postgres value (`None` = NULL).
    pub postgres: Option<String>,
    /// Canonical ClickHouse value (`None` = NULL or column missing).
    pub clickhouse: Option<String>,
}

/// A key whose row differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// The key values, `(a, b)`.
    pub key: String,
    pub kind: DifferenceKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DifferenceKind {
    OnlyInPostgres,
    OnlyInClickHouse,
    /// More than one live row for the key in ClickHouse `FINAL`.
    DuplicateInClickHouse,
    Values(Vec<ColumnDifference>),
}

/// The result for one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    /// `schema.table` in Postgres.
    pub table: String,
    pub postgres_rows: u64,
    pub clickhouse_rows: u64,
    /// Number of differing keys (all of them, not only the reported ones).
    pub differing_keys: u64,
    /// The first [`MAX_REPORTED_DIFFERENCES`] differences in key order.
    pub differences: Vec<Difference>,
    /// A structural problem (missing table or columns), if any.
    pub problem: Option<String>,
}

impl TableReport {
    pub fn is_equal(&self) -> bool {
        self.problem.is_none() && self.differing_keys == 0
    }
}

/// `public.orders  rows pg=1000 ch=1000  OK` or `... MISMATCH ...`; names
/// keys and columns, never other row values.
impl fmt::Display for TableReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}  rows pg={} ch={}  ",
            self.table, self.postgres_rows, self.clickhouse_rows
        )?;
        if self.is_equal() {
            return f.write_str("OK");
        }
        f.write_str("MISMATCH")?;
        if let Some(problem) = &self.problem {
            write!(f, " ({problem})")?;
        }
        if self.differing_keys > 0 {
            write!(f, " {} keys differ; first keys:", self.differing_keys)?;
            for (i, d) in self.differences.iter().enumerate() {
                let sep = if i == 0 { " " } else { ", " };
                let what = match &d.kind {
                    DifferenceKind::OnlyInPostgres => "only in postgres".to_owned(),
                    DifferenceKind::OnlyInClickHouse => "only in clickhouse".to_owned(),
                    DifferenceKind::DuplicateInClickHouse => "duplicate in clickhouse".to_owned(),
                    DifferenceKind::Values(cols) => cols
                        .iter()
                        .map(|c| c.column.as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                };
                write!(f, "{sep}{} [{what}]", d.key)?;
            }
        }
        Ok(())
    }
}

/// How a column's values are read and canonicalised on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ColumnKind {
    Plain,
    /// Postgres prints `t`/`f`, ClickHouse `true`/`false`.
    Bool,
    Float32,
    Float64,
    Decimal {
        precision: u32,
        scale: u32,
        money: bool,
    },
    Date,
    Timestamp {
        utc: bool,
    },
    Time,
    Bytea,
    Array {
        depth: usize,
    },
}

#[derive(Debug, Clone)]
struct Column {
    name: String,
    kind: ColumnKind,
    key: bool,
    /// Absent from the ClickHouse table.
    missing: bool,
}

/// Compares every table of the publication (or only `table`, `schema.table`).
pub async fn verify(config: &Config, table: Option<&str>) -> Result<Vec<TableReport>, VerifyError> {
    let pg = connect_postgres(config).await?;
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
            let tables: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            if tables.is_empty() {
                return Err(VerifyError::NoTables(config.postgres.publication.clone()));
            }
            tables
        }
    };
    let mut reports = Vec::with_capacity(tables.len());
    for (schema, name) in tables {
        reports.push(verify_table(&pg, &ch, &database, &schema, &name).await?);
    }
    Ok(reports)
}

fn split_table_name(name: &str) -> Result<(String, String), VerifyError> {
    match name.split_once('.') {
        Some((schema, table)) if !schema.is_empty() && !table.is_empty() => {
            Ok((schema.to_owned(), table.to_owned()))
        }
        None if !name.is_empty() => Ok(("public".to_owned(), name.to_owned())),
        _ => Err(VerifyError::BadTableName(name.to_owned())),
    }
}

async fn connect_postgres(config: &Config) -> Result<tokio_postgres::Client, VerifyError> {
    let mut pg_config: tokio_postgres::Config = config
        .postgres
        .url
        .parse()
        .map_err(VerifyError::PostgresUrl)?;
    if let Some(password) = read_secret(&config.postgres.password, &config.postgres.password_file)
        .map_err(VerifyError::PasswordFile)?
    {
        pg_config.password(password.expose_secret());
    }
    pg_config.application_name("sluice-verify");
    let (client, connection) =
        pg_config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|source| VerifyError::Postgres {
                context: "connecting".into(),
                source,
            })?;
    // Ends when the client is dropped.
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %error, "verify: postgres connection ended");
        }
    });
    client
        .batch_execute(
            "SET timezone = 'UTC'; SET datestyle = 'ISO'; SET extra_float_digits = 3; \
             SET intervalstyle = 'iso_8601'; SET bytea_output = 'hex'",
        )
        .await
        .map_err(|source| VerifyError::Postgres {
            context: "setting session parameters".into(),
            source,
        })?;
    Ok(client)
}

fn clickhouse_client(config: &Config) -> Result<clickhouse::Client, VerifyError> {
    crate::clickhouse::client(&config.clickhouse).map_err(VerifyError::PasswordFile)
}

async fn clickhouse_rows(
    ch: &clickhouse::Client,
    sql: &str,
    context: &str,
) -> Result<Vec<Vec<Option<String>>>, VerifyError> {
    let bytes = ch
        .query_raw(sql)
        .fetch_bytes("TabSeparated")
        .map_err(|source| VerifyError::ClickHouse {
            context: context.to_owned(),
            source,
        })?
        .collect()
        .await
        .map_err(|source| VerifyError::ClickHouse {
            context: context.to_owned(),
            source,
        })?;
    parse_tsv(&bytes).ok_or_else(|| VerifyError::Malformed {
        context: context.to_owned(),
    })
}

/// Splits TabSeparated output into rows of unescaped fields (`\N` is NULL).
fn parse_tsv(bytes: &[u8]) -> Option<Vec<Vec<Option<String>>>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut rows = Vec::new();
    for line in text.split_terminator('\n') {
        let mut fields = Vec::new();
        for field in line.split('\t') {
            if field == "\\N" {
                fields.push(None);
                continue;
            }
            let mut out = String::with_capacity(field.len());
            let mut chars = field.chars();
            while let Some(c) = chars.next() {
                if c != '\\' {
                    out.push(c);
                    continue;
                }
                match chars.next()? {
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'r' => out.push('\r'),
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    '0' => out.push('\0'),
                    'a' => out.push('\u{7}'),
                    'v' => out.push('\u{b}'),
                    other => out.push(other),
                }
            }
            fields.push(Some(out));
        }
        rows.push(fields);
    }
    Some(rows)
}

fn classify(ch_type: &str, pg_base_type: &str) -> ColumnKind {
    let mut t = ch_type;
    for wrapper in ["LowCardinality(", "Nullable("] {
        if let Some(inner) = t.strip_prefix(wrapper).and_then(|s| s.strip_suffix(')')) {
            t = inner;
        }
    }
    if t.starts_with("Array(") {
        let mut depth = 0;
        let mut rest = t;
        while let Some(inner) = rest.strip_prefix("Array(") {
            depth += 1;
            rest = inner;
        }
        return ColumnKind::Array { depth };
    }
    if pg_base_type == "bytea" {
        return ColumnKind::Bytea;
    }
    if let Some(args) = t.strip_prefix("Decimal(").and_then(|s| s.strip_suffix(')'))
        && let Some((p, s)) = args.split_once(',')
        && let (Ok(precision), Ok(scale)) = (p.trim().parse(), s.trim().parse())
    {
        return ColumnKind::Decimal {
            precision,
            scale,
            money: pg_base_type == "money",
        };
    }
    match t {
        "Bool" => ColumnKind::Bool,
        "Float32" => ColumnKind::Float32,
        "Float64" => ColumnKind::Float64,
        "Date32" => ColumnKind::Date,
        "DateTime64(6)" => ColumnKind::Timestamp { utc: false },
        "DateTime64(6, 'UTC')" => ColumnKind::Timestamp { utc: true },
        "Time64(6)" => ColumnKind::Time,
        _ => ColumnKind::Plain,
    }
}

/// The largest value of `Decimal(precision, scale)` as text.
fn decimal_max(precision: u32, scale: u32) -> String {
    let int_digits = precision.saturating_sub(scale) as usize;
    let int = if int_digits == 0 {
        "0".to_owned()
    } else {
        "9".repeat(int_digits)
    };
    if scale == 0 {
        int
    } else {
        format!("{int}.{}", "9".repeat(scale as usize))
    }
}

fn pg_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The Postgres select expression of a column, applying the loader's clamps.
fn pg_expr(column: &Column) -> String {
    let q = pg_ident(&column.name);
    let clamp = |low: &str, high: &str, ty: &str| {
        format!(
            "CASE WHEN {q} IS NULL THEN NULL ELSE greatest(least({q}, '{high}'::{ty}), '{low}'::{ty}) END"
        )
    };
    match &column.kind {
        ColumnKind::Plain
        | ColumnKind::Bool
        | ColumnKind::Float32
        | ColumnKind::Float64
        | ColumnKind::Time => q,
        ColumnKind::Decimal { money: true, .. } => format!("{q}::numeric"),
        ColumnKind::Decimal {
            precision, scale, ..
        } => {
            let max = decimal_max(*precision, *scale);
            format!(
                "CASE WHEN {q} = 'NaN'::numeric THEN 0::numeric \
                 WHEN {q} = 'Infinity'::numeric THEN {max}::numeric \
                 WHEN {q} = '-Infinity'::numeric THEN -{max}::numeric ELSE {q} END"
            )
        }
        ColumnKind::Date => clamp("1900-01-01", "2299-12-31", "date"),
        ColumnKind::Timestamp { utc } => {
            let ty = if *utc { "timestamptz" } else { "timestamp" };
            let (low, high) = if *utc {
                ("1900-01-01 00:00:00+00", "2299-12-31 23:59:59.999999+00")
            } else {
                ("1900-01-01 00:00:00", "2299-12-31 23:59:59.999999")
            };
            format!(
                "to_char({}, 'YYYY-MM-DD HH24:MI:SS.US')",
                clamp(low, high, ty)
            )
        }
        ColumnKind::Bytea => format!("encode({q}, 'hex')"),
        ColumnKind::Array { .. } => format!("to_jsonb({q})::text"),
    }
}

/// The ClickHouse select expression of a column.
fn ch_expr(column: &Column) -> String {
    if column.missing {
        return "NULL".into();
    }
    let q = quote_ident(&column.name);
    match column.kind {
        ColumnKind::Bytea => format!("lower(hex({q}))"),
        ColumnKind::Array { .. } => format!("toJSONString({q})"),
        _ => q,
    }
}

/// Canonical text of a value read from either side.
fn canonical(kind: &ColumnKind, value: Option<&str>, from_postgres: bool) -> Option<String> {
    if let ColumnKind::Array { depth } = kind {
        return Some(canonical_array(value, *depth, from_postgres));
    }
    let value = value?;
    Some(match kind {
        ColumnKind::Float32 => match value.parse::<f32>() {
            Ok(v) => canonical_float(f64::from(v), v.to_string()),
            Err(_) => value.to_owned(),
        },
        ColumnKind::Float64 => match value.parse::<f64>() {
            Ok(v) => canonical_float(v, v.to_string()),
            Err(_) => value.to_owned(),
        },
        ColumnKind::Decimal { .. } => canonical_decimal(value),
        ColumnKind::Bool => match value {
            "t" | "true" | "1" => "true".into(),
            "f" | "false" | "0" => "false".into(),
            other => other.to_owned(),
        },
        ColumnKind::Time => pad_fraction(value),
        _ => value.to_owned(),
    })
}

fn canonical_float(v: f64, shortest: String) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if v == 0.0 {
        // -0 and 0 are equal as values.
        "0".into()
    } else {
        shortest
    }
}

/// `12.300` → `12.3`, `5.000` → `5`, `-0.00` → `0`.
fn canonical_decimal(value: &str) -> String {
    let mut s = value.to_owned();
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    if s == "-0" { "0".into() } else { s }
}

/// `13:45:00` → `13:45:00.000000`, `13:45:00.5` → `13:45:00.500000`.
fn pad_fraction(value: &str) -> String {
    match value.split_once('.') {
        Some((whole, frac)) => format!("{whole}.{frac:0<6}"),
        None => format!("{value}.000000"),
    }
}

/// An array as a JSON tree whose scalars are all strings, wrapped to the
/// column's depth; NULL and `{}` are both `[]`.
fn canonical_array(value: Option<&str>, depth: usize, from_postgres: bool) -> String {
    let Some(text) = value else {
        return "[]".into();
    };
    let Ok(mut json) = serde_json::from_str::<serde_json::Value>(text) else {
        return format!("unparsable: {text}");
    };
    if from_postgres {
        if json.as_array().is_some_and(Vec::is_empty) {
            return "[]".into();
        }
        let value_depth = json_depth(&json);
        for _ in value_depth..depth {
            json = serde_json::Value::Array(vec![json]);
        }
    }
    stringify_scalars(&json).to_string()
}

/// Depth of nested arrays along the first elements.
fn json_depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.first().map_or(0, json_depth),
        _ => 0,
    }
}

fn stringify_scalars(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Array(items) => Value::Array(items.iter().map(stringify_scalars).collect()),
        Value::Null => Value::Null,
        Value::String(s) => Value::String(s.clone()),
        Value::Number(n) => Value::String(match n.as_f64() {
            Some(f) if !n.is_i64() && !n.is_u64() => canonical_float(f, f.to_string()),
            _ => n.to_string(),
        }),
        other => Value::String(other.to_string()),
    }
}

type Row = Vec<Option<String>>;

async fn verify_table(
    pg: &tokio_postgres::Client,
    ch: &clickhouse::Client,
    database: &str,
    schema: &str,
    table: &str,
) -> Result<TableReport, VerifyError> {
    let qualified = format!("{schema}.{table}");
    let target = target_table_name(schema, table);
    let pg_context = |what: &str| format!("{what} of {qualified}");
    let pg_columns = pg
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

    let pg_count: i64 = pg
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.{}",
                pg_ident(schema),
                pg_ident(table)
            ),
            &[],
        )
        .await
        .map_err(|source| VerifyError::Postgres {
            context: pg_context("counting the rows"),
            source,
        })?
        .get(0);
    let mut report = TableReport {
        table: qualified.clone(),
        postgres_rows: pg_count as u64,
        clickhouse_rows: 0,
        differing_keys: 0,
        differences: Vec::new(),
        problem: None,
    };
    if ch_types.is_empty() {
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
            let base: String = row.get(1);
            match ch_types.get(&name) {
                Some((ty, key)) => Column {
                    kind: classify(ty, &base),
                    key: *key,
                    missing: false,
                    name,
                },
                None => Column {
                    kind: classify("", &base),
                    key: false,
                    missing: true,
                    name,
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
        report.problem = Some("the clickhouse table has no key columns".into());
        return Ok(report);
    }

    let pg_sql = format!(
        "SELECT {} FROM {}.{}",
        columns.iter().map(pg_expr).collect::<Vec<_>>().join(", "),
        pg_ident(schema),
        pg_ident(table)
    );
    let messages = pg
        .simple_query(&pg_sql)
        .await
        .map_err(|source| VerifyError::Postgres {
            context: pg_context("reading the rows"),
            source,
        })?;
    let split = |row: Row| -> (Row, Row) {
        let key = columns
            .iter()
            .zip(&row)
            .filter(|(c, _)| c.key)
            .map(|(_, v)| v.clone())
            .collect();
        (key, row)
    };
    let mut pg_rows: BTreeMap<Row, Row> = BTreeMap::new();
    for message in messages {
        if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
            let values: Row = columns
                .iter()
                .enumerate()
                .map(|(i, c)| canonical(&c.kind, row.get(i), true))
                .collect();
            let (key, values) = split(values);
            pg_rows.insert(key, values);
        }
    }

    let ch_sql = format!(
        "SELECT {} FROM {}.{} FINAL WHERE {} = 0 SETTINGS session_timezone = 'UTC'",
        columns.iter().map(ch_expr).collect::<Vec<_>>().join(", "),
        quote_ident(database),
        quote_ident(&target),
        quote_ident(DELETED_COLUMN)
    );
    let ch_rows = clickhouse_rows(ch, &ch_sql, &format!("rows of {database}.{target}")).await?;
    report.clickhouse_rows = ch_rows.len() as u64;

    let mut differences: BTreeMap<Row, DifferenceKind> = BTreeMap::new();
    let mut seen: BTreeMap<Row, ()> = BTreeMap::new();
    for raw in ch_rows {
        if raw.len() != columns.len() {
            return Err(VerifyError::Malformed {
                context: format!("rows of {database}.{target}"),
            });
        }
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
        let (key, values) = split(values);
        if seen.insert(key.clone(), ()).is_some() {
            differences.insert(key, DifferenceKind::DuplicateInClickHouse);
            continue;
        }
        match pg_rows.remove(&key) {
            None => {
                differences.insert(key, DifferenceKind::OnlyInClickHouse);
            }
            Some(expected) if expected != values => {
                let cols = columns
                    .iter()
                    .zip(expected.into_iter().zip(values))
                    .filter(|(_, (p, c))| p != c)
                    .map(|(column, (p, c))| ColumnDifference {
                        column: column.name.clone(),
                        postgres: p,
                        clickhouse: c,
                    })
                    .collect();
                differences.insert(key, DifferenceKind::Values(cols));
            }
            Some(_) => {}
        }
    }
    for key in pg_rows.into_keys() {
        differences.insert(key, DifferenceKind::OnlyInPostgres);
    }
    report.differing_keys = differences.len() as u64;
    report.differences = differences
        .into_iter()
        .take(MAX_REPORTED_DIFFERENCES)
        .map(|(key, kind)| Difference {
            key: format_key(&key),
            kind,
        })
        .collect();
    Ok(report)
}

fn format_key(key: &[Option<String>]) -> String {
    let parts: Vec<&str> = key.iter().map(|v| v.as_deref().unwrap_or("NULL")).collect();
    format!("({})", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_meet() {
        let f64k = ColumnKind::Float64;
        for (pg, ch) in [
            ("NaN", "nan"),
            ("Infinity", "inf"),
            ("-Infinity", "-inf"),
            ("1e+20", "100000000000000000000"),
            ("0.1", "0.1"),
            ("-0", "0"),
        ] {
            assert_eq!(
                canonical(&f64k, Some(pg), true),
                canonical(&f64k, Some(ch), false),
                "{pg} vs {ch}"
            );
        }
        let bool_kind = classify("Nullable(Bool)", "bool");
        for (pg, ch) in [("t", "true"), ("f", "false")] {
            assert_eq!(
                canonical(&bool_kind, Some(pg), true),
                canonical(&bool_kind, Some(ch), false),
                "{pg} vs {ch}"
            );
        }
        assert_ne!(
            canonical(&bool_kind, Some("t"), true),
            canonical(&bool_kind, Some("false"), false)
        );
        assert_eq!(
            canonical(&ColumnKind::Float32, Some("0.1"), true),
            canonical(&ColumnKind::Float32, Some("0.1"), false)
        );
        let dec = ColumnKind::Decimal {
            precision: 12,
            scale: 3,
            money: false,
        };
        assert_eq!(
            canonical(&dec, Some("12.300"), true).as_deref(),
            Some("12.3")
        );
        assert_eq!(canonical(&dec, Some("5.000"), true).as_deref(), Some("5"));
        assert_eq!(canonical(&dec, Some("-0.000"), true).as_deref(), Some("0"));
        assert_eq!(canonical(&dec, Some("500"), true).as_deref(), Some("500"));
        assert_eq!(pad_fraction("24:00:00"), "24:00:00.000000");
        assert_eq!(pad_fraction("13:45:00.5"), "13:45:00.500000");
        assert_eq!(decimal_max(12, 3), "999999999.999");
        assert_eq!(decimal_max(3, 3), "0.999");
    }

    #[test]
    fn arrays_compare_as_trees() {
        let two = ColumnKind::Array { depth: 2 };
        assert_eq!(
            canonical(&two, Some("[[1, 2], [3, null]]"), true),
            canonical(&two, Some("[[1,2],[3,null]]"), false)
        );
        // A 1-D value in a 2-D column is wrapped; NULL and {} are empty.
        assert_eq!(
            canonical(&two, Some("[1, 2]"), true),
            canonical(&two, Some("[[1,2]]"), false)
        );
        assert_eq!(
            canonical(&two, None, true),
            canonical(&two, Some("[]"), false)
        );
        assert_eq!(
            canonical(&two, Some("[]"), true),
            canonical(&two, Some("[]"), false)
        );
        let one = ColumnKind::Array { depth: 1 };
        assert_eq!(
            canonical(&one, Some(r#"["a", "b\"c"]"#), true),
            canonical(&one, Some(r#"["a","b\"c"]"#), false)
        );
        assert_eq!(
            canonical(&one, Some(r#"[5]"#), true),
            canonical(&one, Some(r#"["5"]"#), false)
        );
    }

    #[test]
    fn classifies_clickhouse_types() {
        assert_eq!(
            classify("Nullable(Decimal(12, 3))", "numeric"),
            ColumnKind::Decimal {
                precision: 12,
                scale: 3,
                money: false
            }
        );
        assert_eq!(
            classify("Array(Array(Nullable(Int32)))", "_int4"),
            ColumnKind::Array { depth: 2 }
        );
        assert_eq!(classify("Nullable(String)", "bytea"), ColumnKind::Bytea);
        assert_eq!(
            classify("Nullable(DateTime64(6, 'UTC'))", "timestamptz"),
            ColumnKind::Timestamp { utc: true }
        );
        assert_eq!(
            classify("LowCardinality(Nullable(String))", "mood"),
            ColumnKind::Plain
        );
    }

    #[test]
    fn tsv_unescapes() {
        let rows = parse_tsv(b"a\\tb\t\\N\tx\\\\y\n1\t2\t3\n").unwrap_or_default();
        assert_eq!(
            rows[0],
            vec![Some("a\tb".into()), None, Some("x\\y".into())]
        );
        assert_eq!(rows.len(), 2);
    }
}
