//! The name of a source table, as both binaries and the wire format use it.

use std::fmt;

/// A Postgres table: schema and name, exactly as the catalog spells them
/// (unquoted, case kept). Displays as `schema.table`, the form of metric
/// labels, log fields and the `--table` option.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> TableName {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Reads `schema.table` as an operator types it (`--table`, `postgres.tables`):
    /// the schema ends at the first `.`; without one the schema is `public`.
    pub fn parse(text: &str) -> TableName {
        match text.split_once('.') {
            Some((schema, name)) => TableName::new(schema, name),
            None => TableName::new("public", text),
        }
    }

    /// `"schema"."table"`, quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A Postgres identifier in double quotes, inner quotes doubled.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_and_parses_schema_dot_table() {
        let t = TableName::parse("sales.orders");
        assert_eq!(t, TableName::new("sales", "orders"));
        assert_eq!(t.to_string(), "sales.orders");
        assert_eq!(
            TableName::parse("orders"),
            TableName::new("public", "orders")
        );
        assert_eq!(TableName::parse("a.b.c"), TableName::new("a", "b.c"));
    }

    #[test]
    fn quotes_hostile_names_for_sql() {
        let t = TableName::new("we\"ird", "Tab le");
        assert_eq!(t.quoted(), "\"we\"\"ird\".\"Tab le\"");
    }
}
