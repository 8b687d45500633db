//! Target tables: DDL from a [`v1::Relation`] and schema evolution.
//!
//! Each source table has one target table
//! `ReplacingMergeTree(_sluice_version, _sluice_deleted)` ordered by the source
//! key (ARCHITECTURE invariant 2: replays are harmless because the highest
//! `_sluice_version` of a key wins, whatever order rows arrive in).
//! `_sluice_version` is the full 128-bit `commit_lsn << 64 | ordinal`
//! ([`sluice_proto::row_version`]): ReplacingMergeTree accepts `UInt128` as its
//! version column (checked against ClickHouse 26.9).
//!
//! With the `is_deleted` column, `SELECT … FINAL` hides deleted keys by
//! itself (ClickHouse 26.9); tombstones stay visible without `FINAL`.
//!
//! Evolution adds columns, renames them and widens types in place
//! ([`widens`]: `MODIFY COLUMN`). Each column's comment holds its Postgres
//! `attnum` ([`attnum_comment`]), the identity a column keeps across `RENAME
//! COLUMN` and never hands to another column: a relation column whose name
//! the table lacks but whose attnum it has was renamed (`RENAME COLUMN`), and
//! one whose name the table has under another attnum is a different column
//! (dropped and added again, or names swapped). Every other difference
//! between the relation and the table is reported as [`SchemaDrift`] for the
//! loader to log and count; a dropped column stays (new rows get its
//! default), while a changed type or key, a replaced column, or a rename
//! that attnums cannot confirm means the table cannot follow in place, so
//! [`SchemaDrift::needs_resync`] says so and the loader resyncs the table
//! before writing a row against it.

use std::collections::{BTreeMap, BTreeSet};

use clickhouse::Client;
use serde::Deserialize;
use sluice_broker::TableName;
use sluice_proto::v1;

use super::error::Error;
use super::names::{target_column_name, target_table_name};
use super::types::{ChType, map_column};

/// Version column: `sluice_proto::row_version` of the row.
pub const VERSION_COLUMN: &str = "_sluice_version";
/// Deletion flag: 1 for a row deleted in Postgres.
pub const DELETED_COLUMN: &str = "_sluice_deleted";
/// When the loader wrote the row (server clock).
pub const SYNCED_AT_COLUMN: &str = "_sluice_synced_at";

/// Quotes a ClickHouse identifier with backticks, escaping `\` and `` ` ``.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('`');
    for c in name.chars() {
        if c == '`' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('`');
    out
}

/// Quotes a ClickHouse string literal.
pub fn quote_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// A column of a target table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetColumn {
    /// The ClickHouse column name: the Postgres one, except for names in
    /// sluice's namespace ([`target_column_name`]).
    pub name: String,
    pub ch_type: ChType,
    /// Part of the source key (the `ORDER BY` of the table).
    pub key: bool,
    /// The Postgres `attnum` (`v1::Column::attnum`); 0 when unknown.
    pub attnum: u32,
}

/// The comment of a column that holds Postgres column `attnum`.
pub fn attnum_comment(attnum: u32) -> String {
    format!("pg attnum {attnum}")
}

/// The Postgres attnum a column comment names ([`attnum_comment`]).
fn comment_attnum(comment: &str) -> Option<u32> {
    comment
        .strip_prefix("pg attnum ")?
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

impl TargetColumn {
    /// `` `name` Type `` and, with a known attnum, its comment.
    fn definition(&self) -> String {
        let mut out = format!("{} {}", quote_ident(&self.name), self.ch_type);
        if self.attnum > 0 {
            out.push_str(" COMMENT ");
            out.push_str(&quote_literal(&attnum_comment(self.attnum)));
        }
        out
    }
}

/// A target table: where a relation's rows go and how they are typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetTable {
    pub database: String,
    pub table: String,
    /// The relation's columns, in relation (= row value) order.
    pub columns: Vec<TargetColumn>,
}

impl TargetTable {
    /// The target of `schema.table` in `database`, typed by [`map_column`],
    /// named by [`target_table_name`] and [`target_column_name`].
    /// Fails for a relation without key columns: rows could not be deduplicated.
    pub fn from_relation(
        database: &str,
        schema: &str,
        table: &str,
        relation: &v1::Relation,
    ) -> Result<Self, Error> {
        let target = TargetTable {
            database: database.to_owned(),
            table: target_table_name(schema, table),
            columns: relation
                .columns
                .iter()
                .map(|c| TargetColumn {
                    name: target_column_name(&c.name),
                    ch_type: map_column(c),
                    key: c.key,
                    attnum: c.attnum,
                })
                .collect(),
        };
        if !target.columns.iter().any(|c| c.key) {
            return Err(Error::NoKey(TableName::new(schema, table).to_string()));
        }
        Ok(target)
    }

    /// The same columns in another table (e.g. a resync's shadow table).
    pub fn with_table(&self, table: &str) -> Self {
        TargetTable {
            table: table.to_owned(),
            ..self.clone()
        }
    }

    /// `` `database`.`table` ``.
    pub fn qualified(&self) -> String {
        let (database, table) = (quote_ident(&self.database), quote_ident(&self.table));
        format!("{database}.{table}")
    }

    /// The columns the loader writes, quoted and comma-separated: the
    /// relation's in order, then the version and the deleted flag (the
    /// RowBinary row layout of [`super::InsertBuilder`]).
    pub fn written_columns(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .chain([quote_ident(VERSION_COLUMN), quote_ident(DELETED_COLUMN)])
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Key columns in relation order.
    pub fn key_columns(&self) -> impl Iterator<Item = &TargetColumn> {
        self.columns.iter().filter(|c| c.key)
    }

    pub fn create_database_sql(&self) -> String {
        format!(
            "CREATE DATABASE IF NOT EXISTS {}",
            quote_ident(&self.database)
        )
    }

    pub fn create_table_sql(&self) -> String {
        let mut cols: Vec<String> = self.columns.iter().map(TargetColumn::definition).collect();
        cols.push(format!("{} UInt128", quote_ident(VERSION_COLUMN)));
        cols.push(format!("{} UInt8", quote_ident(DELETED_COLUMN)));
        cols.push(format!(
            "{} DateTime64(6, 'UTC') DEFAULT now64(6)",
            quote_ident(SYNCED_AT_COLUMN)
        ));
        let key: Vec<String> = self.key_columns().map(|c| quote_ident(&c.name)).collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({}) ENGINE = ReplacingMergeTree({}, {}) ORDER BY ({})",
            self.qualified(),
            cols.join(", "),
            quote_ident(VERSION_COLUMN),
            quote_ident(DELETED_COLUMN),
            key.join(", ")
        )
    }
}

/// A column as ClickHouse reports it in `system.columns`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ExistingColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub ch_type: String,
    pub is_in_sorting_key: u8,
    /// sluice writes the Postgres attnum here ([`attnum_comment`]).
    #[serde(default)]
    pub comment: String,
}

impl ExistingColumn {
    /// The Postgres attnum its comment records, if any.
    fn attnum(&self) -> Option<u32> {
        comment_attnum(&self.comment)
    }
}

/// A difference between a relation and its existing table that evolution
/// (ADD COLUMN) does not repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaDrift {
    /// The table has a column the relation no longer has (dropped in
    /// Postgres, or renamed: see [`SchemaDrift::PossiblyRenamed`]). New rows
    /// get the column's default.
    Dropped { column: String, ch_type: String },
    /// A column disappeared and one of the same type appeared in the same
    /// relation change, and attnums cannot tell whether it was `ALTER TABLE
    /// … RENAME COLUMN` (a table or relation from before sluice recorded
    /// them). The new column was added; old rows keep their value under
    /// `from`.
    PossiblyRenamed { from: String, to: String },
    /// The table's column of this name holds another Postgres column (its
    /// attnum differs): the column was dropped and added again, or names
    /// were swapped. Its values belong to the other column.
    Replaced { column: String, was: u32, now: u32 },
    /// The column's mapped type differs from the table's.
    TypeChanged {
        column: String,
        expected: String,
        actual: String,
    },
    /// A column new to the table whose older rows may hold a value in
    /// Postgres (`ADD COLUMN … DEFAULT`, `v1::Column::has_default`): added
    /// here, they would read NULL.
    AddedWithDefault { column: String },
    /// The relation's key differs from the table's sorting key.
    KeyChanged {
        expected: Vec<String>,
        actual: Vec<String>,
    },
}

impl SchemaDrift {
    /// Whether rows can no longer be written faithfully into the existing
    /// table, so the table must be rebuilt by a resync.
    pub fn needs_resync(&self) -> bool {
        matches!(
            self,
            SchemaDrift::TypeChanged { .. }
                | SchemaDrift::KeyChanged { .. }
                | SchemaDrift::PossiblyRenamed { .. }
                | SchemaDrift::Replaced { .. }
                | SchemaDrift::AddedWithDefault { .. }
        )
    }

    /// Every [`SchemaDrift::kind`].
    pub const KINDS: [&'static str; 6] = [
        "dropped",
        "renamed",
        "replaced",
        "type_changed",
        "key_changed",
        "added_with_default",
    ];

    /// Short label for metrics (`sluice_schema_drift_total{table,kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            SchemaDrift::Dropped { .. } => "dropped",
            SchemaDrift::PossiblyRenamed { .. } => "renamed",
            SchemaDrift::Replaced { .. } => "replaced",
            SchemaDrift::TypeChanged { .. } => "type_changed",
            SchemaDrift::KeyChanged { .. } => "key_changed",
            SchemaDrift::AddedWithDefault { .. } => "added_with_default",
        }
    }
}

/// What to do to an existing table to accept a relation's rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvolutionPlan {
    /// `ALTER TABLE … RENAME COLUMN …` statements for columns renamed in
    /// Postgres (same attnum, new name), run first.
    pub rename_columns: Vec<String>,
    /// `ALTER TABLE … ADD COLUMN …` statements, in relation order.
    pub add_columns: Vec<String>,
    /// `ALTER TABLE … MODIFY COLUMN …` statements for types that widened
    /// ([`widens`]), in relation order.
    pub modify_columns: Vec<String>,
    /// `ALTER TABLE … COMMENT COLUMN …` statements recording the attnum of
    /// columns of a table created before sluice recorded it.
    pub comment_columns: Vec<String>,
    pub drift: Vec<SchemaDrift>,
}

/// The subset of ClickHouse type names sluice creates and [`widens`]
/// reasons about, parsed from `system.columns`; `None` for any other.
fn parse_type(name: &str) -> Option<ChType> {
    let inner = |prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(')'))
    };
    if let Some(inner) = inner("Nullable(") {
        return Some(ChType::Nullable(Box::new(parse_type(inner)?)));
    }
    if let Some(inner) = inner("Array(") {
        return Some(ChType::Array(Box::new(parse_type(inner)?)));
    }
    if let Some(inner) = inner("Decimal(") {
        let (precision, scale) = inner.split_once(',')?;
        return Some(ChType::Decimal {
            precision: precision.trim().parse().ok()?,
            scale: scale.trim().parse().ok()?,
        });
    }
    Some(match name {
        "Int16" => ChType::Int16,
        "Int32" => ChType::Int32,
        "Int64" => ChType::Int64,
        "Float32" => ChType::Float32,
        "Float64" => ChType::Float64,
        "String" => ChType::String,
        _ => return None,
    })
}

/// Whether every value of ClickHouse type `from` (as `system.columns` spells
/// it) fits `to` unchanged, so `MODIFY COLUMN` follows the Postgres change in
/// place: `int2` → `int4` → `int8`, `float4` → `float8`, `numeric(p, s)` to
/// one with at least as many integer and fraction digits, `NOT NULL` dropped,
/// and the same inside arrays. `varchar(n)` → `text` maps to `String` both
/// times and never gets here.
pub fn widens(from: &str, to: &ChType) -> bool {
    // Any type becoming Nullable (a table created before every non-key
    // column was Nullable), spelled the way ClickHouse reports it.
    if let ChType::Nullable(inner) = to
        && inner.to_string() == from
    {
        return true;
    }
    fn wider(from: &ChType, to: &ChType) -> bool {
        use ChType::*;
        let rank = |t: &ChType| match t {
            Int16 => Some(1),
            Int32 => Some(2),
            Int64 => Some(3),
            _ => None,
        };
        match (from, to) {
            (Nullable(a), Nullable(b)) | (Array(a), Array(b)) => wider(a, b),
            (a, Nullable(b)) if !matches!(a, Nullable(_)) => wider(a, b),
            (Float32, Float64) => true,
            (
                Decimal {
                    precision: p1,
                    scale: s1,
                },
                Decimal {
                    precision: p2,
                    scale: s2,
                },
            ) => s2 >= s1 && p2.saturating_sub(*s2) >= p1.saturating_sub(*s1),
            (a, b) => match (rank(a), rank(b)) {
                (Some(x), Some(y)) => x <= y,
                _ => a == b,
            },
        }
    }
    parse_type(from).is_some_and(|from| wider(&from, to))
}

/// Compares a table's current columns with the relation's, knowing nothing
/// of the relation before ([`plan_evolution_after`] with `None`).
pub fn plan_evolution(target: &TargetTable, existing: &[ExistingColumn]) -> EvolutionPlan {
    plan_evolution_after(target, existing, None, &[])
}

/// Compares a table's current columns with the relation's.
///
/// A relation column is found in the table by name, or, when the table
/// lacks the name, by its attnum ([`attnum_comment`]): then it was renamed
/// in Postgres and is renamed here (a key column cannot be: ClickHouse
/// refuses, and the key change needs a resync anyway). A column found by name
/// under another attnum is [`SchemaDrift::Replaced`].
///
/// A column of the table that is not in the relation was dropped. Where
/// attnums are unknown (a table or relation from before sluice recorded
/// them) it may have been renamed if a column of the same type appeared:
/// that is decided among the columns `previous` had (`previous`: the
/// columns of the relation the table was last made to fit, if known; a
/// column dropped earlier stays in the table and is no rename candidate any
/// more), or among all when `previous` is unknown (a resync more than
/// needed, never a renamed column left empty). A column in `defaulted` that
/// the table lacks is [`SchemaDrift::AddedWithDefault`].
pub fn plan_evolution_after(
    target: &TargetTable,
    existing: &[ExistingColumn],
    previous: Option<&[String]>,
    defaulted: &[String],
) -> EvolutionPlan {
    let existing_by_name: BTreeMap<&str, &ExistingColumn> =
        existing.iter().map(|c| (c.name.as_str(), c)).collect();
    let target_names: BTreeSet<&str> = target.columns.iter().map(|c| c.name.as_str()).collect();
    let mut plan = EvolutionPlan::default();
    // Columns added: name, type, attnum.
    let mut added = Vec::new();
    // Columns of the table renamed to a relation column.
    let mut renamed_from = BTreeSet::new();
    for column in &target.columns {
        let ch_type = column.ch_type.to_string();
        let attnum = (column.attnum > 0).then_some(column.attnum);
        let have = match existing_by_name.get(column.name.as_str()) {
            Some(have) => match (have.attnum(), attnum) {
                (Some(was), Some(now)) if was != now => {
                    plan.drift.push(SchemaDrift::Replaced {
                        column: column.name.clone(),
                        was,
                        now,
                    });
                    continue;
                }
                (None, Some(now)) => {
                    plan.comment_columns.push(format!(
                        "ALTER TABLE {} COMMENT COLUMN {} {}",
                        target.qualified(),
                        quote_ident(&column.name),
                        quote_literal(&attnum_comment(now))
                    ));
                    Some(*have)
                }
                _ => Some(*have),
            },
            None => attnum
                .and_then(|now| existing.iter().find(|e| e.attnum() == Some(now)))
                .filter(|from| {
                    from.is_in_sorting_key == 0
                        && !column.key
                        && !target_names.contains(from.name.as_str())
                })
                .inspect(|from| {
                    plan.rename_columns.push(format!(
                        "ALTER TABLE {} RENAME COLUMN {} TO {}",
                        target.qualified(),
                        quote_ident(&from.name),
                        quote_ident(&column.name)
                    ));
                    renamed_from.insert(from.name.as_str());
                }),
        };
        match have {
            None => {
                plan.add_columns.push(format!(
                    "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {}",
                    target.qualified(),
                    column.definition()
                ));
                if !existing.is_empty() && defaulted.contains(&column.name) {
                    plan.drift.push(SchemaDrift::AddedWithDefault {
                        column: column.name.clone(),
                    });
                }
                added.push((column.name.clone(), ch_type, attnum));
            }
            Some(have)
                if have.ch_type != ch_type
                    && have.is_in_sorting_key == 0
                    && widens(&have.ch_type, &column.ch_type) =>
            {
                plan.modify_columns.push(format!(
                    "ALTER TABLE {} MODIFY COLUMN {} {}",
                    target.qualified(),
                    quote_ident(&column.name),
                    ch_type
                ));
            }
            Some(have) if have.ch_type != ch_type => plan.drift.push(SchemaDrift::TypeChanged {
                column: column.name.clone(),
                expected: ch_type,
                actual: have.ch_type.clone(),
            }),
            Some(_) => {}
        }
    }
    let dropped: Vec<&ExistingColumn> = existing
        .iter()
        // sluice's own columns. (A column that only starts like them was a
        // source column's before the naming rule moved it: README "Upgrading".)
        .filter(|c| ![VERSION_COLUMN, DELETED_COLUMN, SYNCED_AT_COLUMN].contains(&c.name.as_str()))
        .filter(|c| {
            !target_names.contains(c.name.as_str()) && !renamed_from.contains(c.name.as_str())
        })
        .collect();
    let renamed: Vec<SchemaDrift> = dropped
        .iter()
        .filter(|c| previous.is_none_or(|names| names.contains(&c.name)))
        .filter_map(|from| {
            // Two known attnums that differ: not a rename.
            let (to, _, _) = added.iter().find(|(_, ty, attnum)| {
                ty == &from.ch_type && (attnum.is_none() || from.attnum().is_none())
            })?;
            Some(SchemaDrift::PossiblyRenamed {
                from: from.name.clone(),
                to: to.clone(),
            })
        })
        .collect();
    if renamed.is_empty() {
        plan.drift
            .extend(dropped.iter().map(|c| SchemaDrift::Dropped {
                column: c.name.clone(),
                ch_type: c.ch_type.clone(),
            }));
    } else {
        plan.drift.extend(renamed);
    }
    let mut expected: Vec<String> = target.key_columns().map(|c| c.name.clone()).collect();
    let mut actual: Vec<String> = existing
        .iter()
        .filter(|c| c.is_in_sorting_key != 0)
        .map(|c| c.name.clone())
        .collect();
    expected.sort();
    actual.sort();
    if !existing.is_empty() && expected != actual {
        plan.drift
            .push(SchemaDrift::KeyChanged { expected, actual });
    }
    plan
}

/// The table's columns from `system.columns` (empty if it does not exist).
pub async fn current_columns(
    client: &Client,
    database: &str,
    table: &str,
) -> Result<Vec<ExistingColumn>, Error> {
    let body = client
        .query_raw(
            "SELECT name, type, is_in_sorting_key, comment FROM system.columns \
             WHERE database = {db:String} AND table = {t:String} ORDER BY position",
        )
        .param("db", database)
        .param("t", table)
        .fetch_bytes("JSONEachRow")
        .map_err(Error::ch("read system.columns"))?
        .collect()
        .await
        .map_err(Error::ch("read system.columns"))?;
    body.split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_slice(line)
                .map_err(|e| Error::Response(format!("system.columns row: {e}")))
        })
        .collect()
}

/// Creates the database and table if needed, adds new columns, and returns
/// the drift that adding columns does not repair.
pub async fn ensure_table(
    client: &Client,
    target: &TargetTable,
) -> Result<Vec<SchemaDrift>, Error> {
    ensure_table_after(client, target, None, &[]).await
}

/// [`ensure_table`] for a table last made to fit a relation with the columns
/// `previous`, for a relation whose columns `defaulted` have a default
/// ([`plan_evolution_after`]).
pub async fn ensure_table_after(
    client: &Client,
    target: &TargetTable,
    previous: Option<&[String]>,
    defaulted: &[String],
) -> Result<Vec<SchemaDrift>, Error> {
    client
        .query_raw(&target.create_database_sql())
        .execute()
        .await
        .map_err(Error::ch("create database"))?;
    client
        .query_raw(&target.create_table_sql())
        .execute()
        .await
        .map_err(Error::ch("create table"))?;
    let existing = current_columns(client, &target.database, &target.table).await?;
    let plan = plan_evolution_after(target, &existing, previous, defaulted);
    for statement in &plan.rename_columns {
        client
            .query_raw(statement)
            .execute()
            .await
            .map_err(Error::ch("rename column"))?;
    }
    for statement in &plan.add_columns {
        client
            .query_raw(statement)
            .execute()
            .await
            .map_err(Error::ch("add column"))?;
    }
    for statement in &plan.modify_columns {
        client
            .query_raw(statement)
            .execute()
            .await
            .map_err(Error::ch("modify column"))?;
    }
    for statement in &plan.comment_columns {
        client
            .query_raw(statement)
            .execute()
            .await
            .map_err(Error::ch("comment column"))?;
    }
    Ok(plan.drift)
}

/// A target `d`.`t` with `(name, type, key)` columns, for unit tests.
#[cfg(test)]
pub(crate) fn test_target(columns: &[(&str, ChType, bool)]) -> TargetTable {
    TargetTable {
        database: "d".into(),
        table: "t".into(),
        columns: columns
            .iter()
            .map(|(name, ch_type, key)| TargetColumn {
                name: (*name).into(),
                ch_type: ch_type.clone(),
                key: *key,
                attnum: 0,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_types_are_followed_in_place_and_nothing_else() {
        let dec = |precision, scale| ChType::Decimal { precision, scale };
        let null = |t: ChType| ChType::Nullable(Box::new(t));
        for (from, to) in [
            ("Int16", ChType::Int32),
            ("Nullable(Int16)", null(ChType::Int64)),
            ("Int32", null(ChType::Int64)),
            ("Nullable(Float32)", null(ChType::Float64)),
            ("Decimal(10, 2)", dec(14, 4)),
            ("Nullable(Decimal(10, 2))", null(dec(12, 2))),
            (
                "Array(Nullable(Int32))",
                ChType::Array(Box::new(null(ChType::Int64))),
            ),
        ] {
            assert!(widens(from, &to), "{from} -> {to}");
        }
        for (from, to) in [
            ("Int64", ChType::Int32),
            ("Nullable(Int32)", ChType::Int64),
            ("Float64", ChType::Float32),
            ("Int32", ChType::Float64),
            ("String", ChType::Int32),
            ("Int32", ChType::String),
            ("Decimal(10, 2)", dec(10, 4)),
            ("Decimal(10, 2)", dec(12, 1)),
            ("DateTime64(6)", ChType::DateTime64 { utc: true }),
            ("LowCardinality(String)", ChType::String),
        ] {
            assert!(!widens(from, &to), "{from} -> {to}");
        }
    }

    #[test]
    fn a_column_added_with_a_default_needs_a_resync_unless_the_table_is_new() {
        let target = test_target(&[
            ("id", ChType::Int64, true),
            ("flag", ChType::Int32.nullable(), false),
        ]);
        let id = existing("id", "Int64", true);
        let flag = ["flag".to_owned()];
        let plan = plan_evolution_after(&target, std::slice::from_ref(&id), None, &flag);
        assert_eq!(
            plan.drift,
            [SchemaDrift::AddedWithDefault {
                column: "flag".into()
            }]
        );
        assert!(plan.drift[0].needs_resync());
        // Without a default: added, nothing to reload.
        let plan = plan_evolution_after(&target, std::slice::from_ref(&id), None, &[]);
        assert!(plan.drift.is_empty() && plan.add_columns.len() == 1);
        // A table being created has every column already.
        assert!(
            plan_evolution_after(&target, &[], None, &flag)
                .drift
                .is_empty()
        );
    }

    #[test]
    fn a_widened_column_is_modified_and_a_key_column_is_not() {
        let target = test_target(&[
            ("id", ChType::Int64, true),
            ("n", ChType::Int64.nullable(), false),
        ]);
        let plan = plan_evolution(
            &target,
            &[
                existing("id", "Int64", true),
                existing("n", "Nullable(Int32)", false),
            ],
        );
        assert_eq!(
            plan.modify_columns,
            ["ALTER TABLE `d`.`t` MODIFY COLUMN `n` Nullable(Int64)"]
        );
        assert!(plan.drift.is_empty(), "{:?}", plan.drift);
        let plan = plan_evolution(
            &target,
            &[
                existing("id", "Int32", true),
                existing("n", "Nullable(Int64)", false),
            ],
        );
        assert!(plan.modify_columns.is_empty());
        assert!(plan.drift.iter().all(SchemaDrift::needs_resync) && !plan.drift.is_empty());
    }

    #[test]
    fn every_drift_kind_is_listed() {
        for drift in [
            SchemaDrift::Dropped {
                column: "c".into(),
                ch_type: "String".into(),
            },
            SchemaDrift::PossiblyRenamed {
                from: "a".into(),
                to: "b".into(),
            },
            SchemaDrift::TypeChanged {
                column: "c".into(),
                expected: "Int32".into(),
                actual: "Int64".into(),
            },
            SchemaDrift::KeyChanged {
                expected: vec!["id".into()],
                actual: vec![],
            },
            SchemaDrift::Replaced {
                column: "c".into(),
                was: 2,
                now: 3,
            },
            SchemaDrift::AddedWithDefault { column: "c".into() },
        ] {
            assert!(SchemaDrift::KINDS.contains(&drift.kind()), "{drift:?}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a`b\\c"), "`a\\`b\\\\c`");
        assert_eq!(quote_literal("it's"), "'it\\'s'");
    }

    /// A source table and columns in sluice's namespace get their own names,
    /// so the DDL never names a bookkeeping column twice.
    #[test]
    fn source_names_in_sluices_namespace_are_renamed() {
        let column = |name: &str, key: bool| v1::Column {
            name: name.into(),
            type_oid: 25,
            type_kind: v1::TypeKind::Base as i32,
            nullable: !key,
            key,
            ..Default::default()
        };
        let relation = v1::Relation {
            columns: vec![
                column("id", true),
                column(VERSION_COLUMN, false),
                column(DELETED_COLUMN, false),
                column("__sluice_version", false),
            ],
            ..Default::default()
        };
        let target =
            TargetTable::from_relation("d", "public", "_sluice_positions", &relation).unwrap();
        assert_eq!(target.table, "public.%5Fsluice_positions");
        let names: Vec<&str> = target.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "id",
                "__sluice_version",
                "__sluice_deleted",
                "___sluice_version"
            ]
        );
        assert_eq!(
            target.written_columns(),
            "`id`, `__sluice_version`, `__sluice_deleted`, `___sluice_version`, \
             `_sluice_version`, `_sluice_deleted`"
        );
    }

    fn existing(name: &str, ty: &str, key: bool) -> ExistingColumn {
        ExistingColumn {
            name: name.into(),
            ch_type: ty.into(),
            is_in_sorting_key: key as u8,
            comment: String::new(),
        }
    }

    /// `target` with attnums 1, 2, … in column order.
    fn numbered(mut target: TargetTable) -> TargetTable {
        for (n, column) in (1..).zip(&mut target.columns) {
            column.attnum = n;
        }
        target
    }

    fn with_attnum(column: ExistingColumn, attnum: u32) -> ExistingColumn {
        ExistingColumn {
            comment: attnum_comment(attnum),
            ..column
        }
    }

    #[test]
    fn attnums_tell_a_rename_from_a_replaced_column() {
        let target = numbered(test_target(&[
            ("id", ChType::Int64, true),
            ("renamed", ChType::Int64.nullable(), false),
            ("c", ChType::String.nullable(), false),
        ]));
        // Column 2 was `old`, and narrower: renamed, then widened.
        let have = [
            with_attnum(existing("id", "Int64", true), 1),
            with_attnum(existing("old", "Nullable(Int32)", false), 2),
            with_attnum(existing("c", "Nullable(String)", false), 3),
        ];
        let plan = plan_evolution(&target, &have);
        assert_eq!(
            plan.rename_columns,
            ["ALTER TABLE `d`.`t` RENAME COLUMN `old` TO `renamed`"]
        );
        assert_eq!(
            plan.modify_columns,
            ["ALTER TABLE `d`.`t` MODIFY COLUMN `renamed` Nullable(Int64)"]
        );
        assert!(
            plan.add_columns.is_empty() && plan.drift.is_empty(),
            "{plan:?}"
        );
        // `c` dropped and added again (attnum 4 now): its values are stale.
        let mut again = target.clone();
        again.columns[2].attnum = 4;
        let plan = plan_evolution(&again, &have);
        assert_eq!(
            plan.drift,
            [SchemaDrift::Replaced {
                column: "c".into(),
                was: 3,
                now: 4
            }]
        );
        assert!(plan.drift[0].needs_resync());
        // A different column of the same type appears as another disappears:
        // known attnums say it is no rename.
        let plan = plan_evolution(
            &numbered(test_target(&[
                ("id", ChType::Int64, true),
                ("c", ChType::String.nullable(), false),
                ("d", ChType::String.nullable(), false),
            ])),
            &[
                with_attnum(existing("id", "Int64", true), 1),
                with_attnum(existing("c", "Nullable(String)", false), 2),
                with_attnum(existing("gone", "Nullable(String)", false), 9),
            ],
        );
        assert_eq!(plan.drift.len(), 1, "{plan:?}");
        assert!(!plan.drift[0].needs_resync(), "{plan:?}");
        // A table from before attnums were recorded gets them as comments.
        let plan = plan_evolution(&target, &[existing("id", "Int64", true)]);
        assert_eq!(
            plan.comment_columns,
            ["ALTER TABLE `d`.`t` COMMENT COLUMN `id` 'pg attnum 1'"]
        );
        assert_eq!(
            plan.add_columns[0],
            "ALTER TABLE `d`.`t` ADD COLUMN IF NOT EXISTS `renamed` Nullable(Int64) \
             COMMENT 'pg attnum 2'"
        );
        // A key column cannot be renamed in place.
        let key = numbered(test_target(&[("key", ChType::Int64, true)]));
        let plan = plan_evolution(&key, &[with_attnum(existing("id", "Int64", true), 1)]);
        assert!(plan.rename_columns.is_empty());
        assert!(plan.drift.iter().any(SchemaDrift::needs_resync), "{plan:?}");
    }

    #[test]
    fn evolution() {
        let target = TargetTable {
            database: "d".into(),
            table: "t".into(),
            columns: vec![
                TargetColumn {
                    name: "id".into(),
                    ch_type: ChType::Int32,
                    key: true,
                    attnum: 0,
                },
                TargetColumn {
                    name: "b".into(),
                    ch_type: ChType::String,
                    key: false,
                    attnum: 0,
                },
                TargetColumn {
                    name: "c".into(),
                    ch_type: ChType::Int64,
                    key: false,
                    attnum: 0,
                },
            ],
        };
        let have = [
            existing("id", "Int32", true),
            existing("a", "String", false),
            existing("c", "Int32", false),
            existing(VERSION_COLUMN, "UInt128", false),
        ];
        let plan = plan_evolution(&target, &have);
        assert_eq!(
            plan.add_columns,
            ["ALTER TABLE `d`.`t` ADD COLUMN IF NOT EXISTS `b` String"]
        );
        // int4 -> int8 widens: followed in place.
        assert_eq!(
            plan.modify_columns,
            ["ALTER TABLE `d`.`t` MODIFY COLUMN `c` Int64"]
        );
        assert_eq!(
            plan.drift,
            [SchemaDrift::PossiblyRenamed {
                from: "a".into(),
                to: "b".into()
            },]
        );
    }
}
