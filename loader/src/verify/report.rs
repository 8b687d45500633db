//! What `verify` found for one table, and its one-line text form: the
//! report names keys and columns, never other row values.

use std::fmt;

/// At most this many differing keys are kept per table.
pub const MAX_REPORTED_DIFFERENCES: usize = 10;

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
#[derive(Debug, Clone, PartialEq)]
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
    /// The share of keys compared, when only a sample was (the row counts
    /// are the sample's).
    pub sample: Option<f64>,
    /// When the table was compared by checksums first: the key buckets
    /// holding rows, and those whose checksums differed (only these were
    /// compared value by value).
    pub checksums: Option<Checksums>,
}

/// The checksum pass of one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksums {
    pub buckets: u64,
    pub differing_buckets: u64,
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
        if let Some(fraction) = self.sample {
            write!(f, "(sample of {:.1}% of keys)  ", fraction * 100.0)?;
        }
        if self.is_equal() {
            return f.write_str("OK");
        }
        f.write_str("MISMATCH")?;
        if let Some(problem) = &self.problem {
            write!(f, " ({problem})")?;
        }
        if self.differing_keys > 0 {
            write!(f, " {} keys differ", self.differing_keys)?;
            if let Some(checksums) = self.checksums {
                write!(
                    f,
                    " (in {} of {} key buckets whose checksums differ)",
                    checksums.differing_buckets, checksums.buckets
                )?;
            }
            f.write_str("; first keys:")?;
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
