//! How source names become ClickHouse names (ARCHITECTURE.md invariant 8):
//! the one place that decides the name of a target table, of a resync's
//! shadow table and of a target column. Every other module asks here.
//!
//! # Tables
//!
//! A source table `schema.table` gets the **simple** name that sluice always
//! used, `table` in schema `public` and `schema__table` elsewhere, when that
//! name cannot be mistaken for another table's:
//!
//! - neither part contains `.`;
//! - the table contains no `__`;
//! - outside `public`, the schema contains no `__` and does not end with `_`
//!   (so the first `__` of `schema__table` is the separator);
//! - the name does not start with [`RESERVED_PREFIX`].
//!
//! Any other table gets the **escaped** name `esc(schema).esc(table)`, where
//! `esc` percent-encodes `%` (`%25`), `.` (`%2E`) and a leading `_` (`%5F`).
//!
//! Why no two source tables share a name (the unit tests below check the
//! tricky pairs and random names):
//!
//! - an escaped name contains exactly one `.` (the separator; `esc` leaves
//!   none), a simple name none: the two forms never meet;
//! - escaped names: percent-encoding is decodable, and the one `.` splits the
//!   name back into `esc(schema)` and `esc(table)`;
//! - simple names: a name with `__` splits at its first `__` into a schema
//!   other than `public` and a table; a name without `__` is a `public` table
//!   (its table contains no `__`, and `schema__table` always does).
//!
//! And none reaches sluice's own tables: they all start with
//! [`RESERVED_PREFIX`] (the positions table, shadow tables), while a simple
//! name never does (the last rule) and an escaped name starts with
//! `esc(schema)`, which never starts with `_`.
//!
//! # Columns
//!
//! A source column named one or more `_` followed by `sluice` (such as
//! `_sluice_version`) gets one more leading `_` in ClickHouse
//! (`__sluice_version`); every other column keeps its name. Adding a `_` is
//! injective and a renamed column starts with `__`, so no two source columns
//! share a ClickHouse column, and no source column reaches a bookkeeping column
//! (`_sluice_version`, `_sluice_deleted`, `_sluice_synced_at`: exactly one
//! `_` before `sluice`).

/// The prefix of every table and column sluice itself creates in ClickHouse;
/// no source table or column is mapped to a name starting with it.
pub const RESERVED_PREFIX: &str = "_sluice";

/// The name of the target table of source table `schema.table` (see the
/// module documentation for the rule and why it is injective).
pub fn target_table_name(schema: &str, table: &str) -> String {
    match simple_name(schema, table) {
        Some(name) => name,
        None => format!("{}.{}", escape(schema), escape(table)),
    }
}

/// `table` or `schema__table`, when no other source table can have that name.
fn simple_name(schema: &str, table: &str) -> Option<String> {
    if schema.contains('.') || table.contains('.') || table.contains("__") {
        return None;
    }
    let name = if schema == "public" {
        table.to_owned()
    } else {
        if schema.contains("__") || schema.ends_with('_') {
            return None;
        }
        format!("{schema}__{table}")
    };
    (!name.starts_with(RESERVED_PREFIX)).then_some(name)
}

/// Percent-encodes `%`, `.` and a leading `_` of one part of a name.
fn escape(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for (i, c) in part.char_indices() {
        match c {
            '%' => out.push_str("%25"),
            '.' => out.push_str("%2E"),
            '_' if i == 0 => out.push_str("%5F"),
            c => out.push(c),
        }
    }
    out
}

/// The shadow table a resync of the target table `live` fills (ARCHITECTURE.md
/// invariant 4): inside sluice's reserved namespace, so no source table can
/// be mapped onto it, and distinct per live table.
pub fn shadow_table_name(live: &str) -> String {
    format!("{RESERVED_PREFIX}_resync__{live}")
}

/// The ClickHouse name of source column `column` (see the module
/// documentation): one more leading `_` for `_…_sluice…`, unchanged otherwise.
pub fn target_column_name(column: &str) -> String {
    if column.starts_with('_') && column.trim_start_matches('_').starts_with("sluice") {
        format!("_{column}")
    } else {
        column.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::clickhouse::schema::{DELETED_COLUMN, SYNCED_AT_COLUMN, VERSION_COLUMN};
    use crate::positions::POSITIONS_TABLE;

    /// Names sluice itself gives tables and columns.
    fn reserved(name: &str) -> bool {
        name.starts_with(RESERVED_PREFIX)
    }

    #[test]
    fn ordinary_tables_keep_their_names() {
        assert_eq!(target_table_name("public", "t"), "t");
        assert_eq!(target_table_name("sales", "orders"), "sales__orders");
        assert_eq!(
            target_table_name("sales", "order_items"),
            "sales__order_items"
        );
        assert_eq!(target_table_name("public", "_t"), "_t");
        assert_eq!(target_table_name("s", "_t"), "s___t");
        assert_eq!(target_table_name("_s", "t"), "_s__t");
        assert_eq!(target_table_name("public", "Zürich"), "Zürich");
    }

    #[test]
    fn ambiguous_tables_are_escaped() {
        assert_eq!(target_table_name("public", "a__b"), "public.a__b");
        assert_eq!(target_table_name("a", "b.c"), "a.b%2Ec");
        assert_eq!(target_table_name("a.b", "c"), "a%2Eb.c");
        assert_eq!(target_table_name("a_", "b"), "a_.b");
        assert_eq!(
            target_table_name("public", "_sluice_positions"),
            "public.%5Fsluice_positions"
        );
        assert_eq!(target_table_name("_sluice", "t"), "%5Fsluice.t");
        assert_eq!(target_table_name("p%", "x.y"), "p%25.x%2Ey");
    }

    /// The pairs that collided (or could) under a naive rule.
    #[test]
    fn tricky_names_are_distinct_and_never_reserved() {
        let tables = [
            ("a", "b"),
            ("public", "a__b"),
            ("a__b", "c"),
            ("a", "b__c"),
            ("a_", "b"),
            ("a", "_b"),
            ("a_", "_b"),
            ("a", "__b"),
            ("a___b", "c"),
            ("a", "b.c"),
            ("a.b", "c"),
            ("public", "a.b"),
            ("public", "a.b.c"),
            ("public", "a%2Eb"),
            ("public", "a%2Eb.c"),
            ("a%2Eb", "c"),
            ("a%", "b"),
            ("a", "%b"),
            ("a%25", "b"),
            ("public", "_sluice_positions"),
            ("public", "_sluice_resync__t"),
            ("public", "t__sluice_resync"),
            ("t", "sluice_resync"),
            ("_sluice", "positions"),
            ("_sluice_resync", "t"),
            ("public", "%5Fsluice_positions"),
            ("public", "%5Fsluice"),
            ("%5Fsluice", "positions"),
            ("public", "public__t"),
            ("public", "t"),
            ("public", "_"),
            ("_", "_"),
            ("_", "public"),
            ("public", "__"),
            ("public", "."),
            (".", "."),
            ("public", "é"),
            ("é", "ü__x"),
            ("é__ü", "x"),
            ("Public", "t"),
            ("public", "T"),
            ("s p", "t\"q"),
            ("s", "t`q"),
        ];
        let mut seen: BTreeMap<String, (&str, &str)> = BTreeMap::new();
        for (schema, table) in tables {
            let name = target_table_name(schema, table);
            assert!(!reserved(&name), "{schema}.{table} -> {name}");
            assert!(!name.is_empty());
            if let Some(other) = seen.insert(name.clone(), (schema, table)) {
                panic!("{schema}.{table} and {other:?} both map to {name}");
            }
        }
        // sluice's own tables are reserved, hence out of every source's reach.
        assert!(reserved(POSITIONS_TABLE));
        for live in seen.keys() {
            assert!(reserved(&shadow_table_name(live)));
        }
    }

    /// A small deterministic generator (no extra dependency): names drawn
    /// from the characters the rule cares about.
    struct Names(u64);

    impl Names {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn name(&mut self) -> String {
            const PIECES: [&str; 12] = [
                "_", "__", ".", "%", "a", "b", "public", "sluice", "_sluice", "%2E", "%5F", "é",
            ];
            let len = 1 + self.next() % 4;
            (0..len)
                .map(|_| PIECES[(self.next() % PIECES.len() as u64) as usize])
                .collect()
        }
    }

    #[test]
    fn random_names_are_distinct_and_never_reserved() {
        let mut names = Names(0x5eed_0f5a_1c00);
        let mut seen: BTreeMap<String, (String, String)> = BTreeMap::new();
        for _ in 0..200_000 {
            let (schema, table) = (names.name(), names.name());
            let name = target_table_name(&schema, &table);
            assert!(!reserved(&name), "{schema}.{table} -> {name}");
            match seen.get(&name) {
                Some(other) => assert_eq!(other, &(schema, table), "both map to {name}"),
                None => {
                    seen.insert(name, (schema, table));
                }
            }
        }
        assert!(seen.len() > 10_000, "the generator makes too few names");
    }

    #[test]
    fn shadow_names_are_distinct_per_table() {
        assert_eq!(shadow_table_name("orders"), "_sluice_resync__orders");
        let shadows: BTreeSet<String> = ["a", "a__b", "public.a__b", "a.b__c"]
            .into_iter()
            .map(shadow_table_name)
            .collect();
        assert_eq!(shadows.len(), 4);
    }

    #[test]
    fn columns_never_reach_bookkeeping_columns() {
        for bookkeeping in [VERSION_COLUMN, DELETED_COLUMN, SYNCED_AT_COLUMN] {
            assert!(reserved(bookkeeping));
            assert_eq!(target_column_name(bookkeeping), format!("_{bookkeeping}"));
        }
        assert_eq!(target_column_name("id"), "id");
        assert_eq!(target_column_name("_id"), "_id");
        assert_eq!(target_column_name("sluice_version"), "sluice_version");
        assert_eq!(target_column_name("__sluice_version"), "___sluice_version");
        assert_eq!(target_column_name("_sluicer"), "__sluicer");
        assert_eq!(target_column_name("a b`\"\\é"), "a b`\"\\é");
        let mut names = Names(7);
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for _ in 0..50_000 {
            let column = names.name();
            let mapped = target_column_name(&column);
            assert!(!reserved(&mapped), "{column} -> {mapped}");
            if let Some(other) = seen.insert(mapped.clone(), column.clone()) {
                assert_eq!(other, column, "both map to {mapped}");
            }
        }
    }
}
