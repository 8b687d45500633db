//! What a publication publishes of one table (Postgres 15+): its column list
//! and row filter, as both the replicator's snapshot and the loader's `verify`
//! must read them (ARCHITECTURE.md invariant 7).

use sluice_broker::TableName;

/// The column list and row filter of one table in a publication. Both `None`
/// when the publication publishes every column and every row, or on Postgres
/// before 15 (which has neither).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishedView {
    /// `pg_publication_tables.attnames`: the published columns.
    pub columns: Option<Vec<String>>,
    /// `pg_publication_tables.rowfilter`: a boolean SQL expression over the
    /// table's columns, as `pg_get_expr` prints it (trusted catalog text).
    pub row_filter: Option<String>,
}

impl PublishedView {
    /// ` WHERE (<row filter>)`, or nothing.
    pub fn where_clause(&self) -> String {
        match &self.row_filter {
            Some(filter) => format!(" WHERE ({filter})"),
            None => String::new(),
        }
    }

    /// Whether the column `name` is published.
    pub fn publishes(&self, name: &str) -> bool {
        self.columns
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    }
}

/// The [`PublishedView`] of `table` in `publication`. A table the publication
/// does not list gets the default view (every column, every row).
pub async fn published_view(
    client: &tokio_postgres::Client,
    publication: &str,
    table: &TableName,
) -> Result<PublishedView, tokio_postgres::Error> {
    let version = crate::version::server_version_num(client).await?;
    if !crate::version::has_publication_column_lists(version) {
        return Ok(PublishedView::default());
    }
    let row = client
        .query_opt(
            "SELECT attnames::text[], rowfilter FROM pg_catalog.pg_publication_tables \
             WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&publication, &table.schema, &table.name],
        )
        .await?;
    Ok(match row {
        Some(row) => PublishedView {
            columns: row.get(0),
            row_filter: row.get(1),
        },
        None => PublishedView::default(),
    })
}

/// How a publication narrows one table: its explicit column list (attribute
/// numbers, `pg_publication_rel.prattrs`) and row filter (`prqual`), as text.
/// `(None, None)` for a table published whole.
pub type Narrowing = (Option<String>, Option<String>);

/// The [`Narrowing`] of every table `publication` lists with a column list
/// or a row filter (Postgres 15+; empty before, and for tables published
/// whole, `FOR ALL TABLES` or `FOR TABLES IN SCHEMA`). Unlike
/// `pg_publication_tables.attnames`, it does not change when a column is added
/// to a table published without a column list: it changes only when the
/// publication does (`ALTER PUBLICATION … SET TABLE`).
pub async fn narrowings(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<std::collections::HashMap<TableName, Narrowing>, tokio_postgres::Error> {
    let version = crate::version::server_version_num(client).await?;
    if !crate::version::has_publication_column_lists(version) {
        return Ok(Default::default());
    }
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, pr.prattrs::text,                     pg_catalog.pg_get_expr(pr.prqual, pr.prrelid)              FROM pg_catalog.pg_publication_rel pr              JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid              JOIN pg_catalog.pg_class c ON c.oid = pr.prrelid              JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace              WHERE p.pubname = $1 AND (pr.prattrs IS NOT NULL OR pr.prqual IS NOT NULL)",
            &[&publication],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| {
            (
                TableName::new(row.get::<_, String>(0), row.get::<_, String>(1)),
                (row.get(2), row.get(3)),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_view_publishes_everything() {
        assert_eq!(PublishedView::default().where_clause(), "");
        assert!(PublishedView::default().publishes("ssn"));
        let view = PublishedView {
            columns: Some(vec!["id".into(), "name".into()]),
            row_filter: Some("(region = 'eu'::text)".into()),
        };
        assert_eq!(view.where_clause(), " WHERE ((region = 'eu'::text))");
        assert!(view.publishes("name"));
        assert!(!view.publishes("ssn"));
    }
}
