//! Table and type metadata from the Postgres catalog.
//!
//! pgoutput's Relation message names each column's type only by OID. To turn a
//! column's text value into a typed wire value ([`sluice_proto::values`]) and to tell
//! the loader what a column is ([`sluice_proto::v1::Column`]), the replicator
//! resolves every OID once through `pg_type` and caches the answer in a
//! [`TypeCatalog`].
//!
//! Invariant 6 of ARCHITECTURE.md lives here too: a published table without a
//! usable replica identity (identity NOTHING, or DEFAULT without a primary key,
//! or USING INDEX on an index that no longer exists) is reported as
//! [`CatalogError::NoReplicaIdentity`] naming the table, because its UPDATEs and
//! DELETEs could not be keyed and would be silently lost.

use std::collections::{BTreeMap, HashMap};

use sluice_broker::TableName;
use sluice_proto::v1;

pub use sluice_proto::values::{TypeCategory, TypeInfo, oid};

/// Why catalog metadata could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The catalog query failed (connection lost, permission denied, ...).
    #[error("catalog query failed while {what}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("type oid {oid} does not exist in pg_type")]
    TypeNotFound { oid: u32 },
    /// [`to_relation`] met a column type not yet resolved by [`TypeCatalog::resolve`].
    #[error("type oid {oid} was not resolved before building the relation")]
    TypeNotResolved { oid: u32 },
    #[error("domain or array type chain of oid {oid} is too deep or cyclic")]
    TypeChainTooDeep { oid: u32 },
    #[error("table {table} does not exist")]
    TableNotFound { table: TableName },
    #[error("publication {publication} does not exist")]
    PublicationNotFound { publication: String },
    /// UPDATE and DELETE of this table cannot be keyed: set a primary key or
    /// `ALTER TABLE … REPLICA IDENTITY FULL | USING INDEX …`.
    #[error(
        "table {table} has no usable replica identity \
         (needs a primary key, REPLICA IDENTITY USING INDEX, or REPLICA IDENTITY FULL)"
    )]
    NoReplicaIdentity { table: TableName },
}

impl CatalogError {
    /// The table itself cannot be replicated as it is (the other tables can):
    /// `crate::recovery` fails that table alone (ARCHITECTURE.md invariant 10).
    pub fn concerns_one_table(&self) -> bool {
        matches!(self, CatalogError::NoReplicaIdentity { .. })
    }
}

/// Whether a published table can be replicated: `Ok(Err(reason))` when it
/// cannot (the reserved schema `_control`, or a catalog error of that table
/// alone, [`CatalogError::concerns_one_table`]); its column types are
/// resolved into `types` when it can. Other catalog errors are `Err`.
pub async fn replicable(
    client: &tokio_postgres::Client,
    table: &TableName,
    types: &mut TypeCatalog,
) -> Result<Result<(), String>, CatalogError> {
    if table.schema == sluice_broker::topology::CONTROL_TOKEN {
        return Ok(Err(format!(
            "schema name `{}` is reserved by sluice",
            sluice_broker::topology::CONTROL_TOKEN
        )));
    }
    match table_columns(client, table).await {
        Ok(info) => {
            types.resolve_table(client, &info).await?;
            Ok(Ok(()))
        }
        Err(error) if error.concerns_one_table() => Ok(Err(error.to_string())),
        Err(error) => Err(error),
    }
}

/// The column lists and row filters of `publication`
/// ([`sluice_postgres::publication::narrowings`]).
pub async fn narrowings(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<HashMap<TableName, sluice_postgres::publication::Narrowing>, CatalogError> {
    sluice_postgres::publication::narrowings(client, publication)
        .await
        .map_err(query_err(
            "reading the publication's column lists and row filters",
        ))
}

/// The leaf partitions (OID → name) of each partitioned table `publication`
/// publishes through its root (`publish_via_partition_root`; without it the
/// publication lists the leaves themselves). A leaf attached or detached
/// while streaming changes which rows the root holds without a change
/// message: [`rows_from_before_attach`], [`may_hold_rows`].
pub async fn partition_leaves(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<HashMap<TableName, BTreeMap<u32, TableName>>, CatalogError> {
    let rows = client
        .query(
            "SELECT pt.schemaname::text, pt.tablename::text, l.oid, ln.nspname::text, \
                    l.relname::text \
             FROM pg_catalog.pg_publication_tables pt \
             JOIN pg_catalog.pg_namespace n ON n.nspname = pt.schemaname \
             JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename \
             CROSS JOIN LATERAL pg_catalog.pg_partition_tree(c.oid) t \
             JOIN pg_catalog.pg_class l ON l.oid = t.relid \
             JOIN pg_catalog.pg_namespace ln ON ln.oid = l.relnamespace \
             WHERE pt.pubname = $1 AND c.relkind = 'p' AND t.isleaf AND l.relkind = 'r'",
            &[&publication],
        )
        .await
        .map_err(query_err("reading the partitions of the published tables"))?;
    let mut leaves: HashMap<TableName, BTreeMap<u32, TableName>> = HashMap::new();
    for row in &rows {
        leaves
            .entry(TableName::new(
                row.get::<_, String>(0),
                row.get::<_, String>(1),
            ))
            .or_default()
            .insert(
                row.get(2),
                TableName::new(row.get::<_, String>(3), row.get::<_, String>(4)),
            );
    }
    Ok(leaves)
}

/// Whether the leaf partition `oid` holds a row version written before it
/// joined its partition tree (`ATTACH PARTITION` of a filled table): such a
/// row never came through the stream. A row version is that old when its
/// `xmin` is older than every `pg_inherits` entry on the way from the leaf
/// to the root (the newest one is the attach, or the `CREATE … PARTITION
/// OF`). A row updated since has a newer version that did come through the
/// stream. A transaction that had its xid before the attach and wrote the
/// leaf after it makes a row look older than it is: a resync more than
/// needed, never a row missed.
pub async fn rows_from_before_attach(
    client: &tokio_postgres::Client,
    leaf: &TableName,
    oid: u32,
) -> Result<bool, CatalogError> {
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM ONLY {} WHERE age(xmin) > \
             (SELECT min(age(i.xmin)) FROM pg_catalog.pg_inherits i \
              WHERE i.inhrelid IN \
              (SELECT relid FROM pg_catalog.pg_partition_ancestors($1::oid::regclass))))",
        leaf.quoted()
    );
    let row = client
        .query_one(&sql, &[&oid])
        .await
        .map_err(query_err("reading the rows of an attached partition"))?;
    Ok(row.get(0))
}

/// Whether the table `oid`, a leaf partition until it was detached or
/// dropped, may still hold rows its root's ClickHouse table has: it was
/// dropped (nothing says what it held), or it has a row.
pub async fn may_hold_rows(
    client: &tokio_postgres::Client,
    oid: u32,
) -> Result<bool, CatalogError> {
    let name = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[&oid],
        )
        .await
        .map_err(query_err("reading pg_class"))?;
    let Some(name) = name else {
        return Ok(true);
    };
    let table = TableName::new(name.get::<_, String>(0), name.get::<_, String>(1));
    let row = client
        .query_one(
            &format!("SELECT EXISTS (SELECT 1 FROM ONLY {})", table.quoted()),
            &[],
        )
        .await
        .map_err(query_err("reading the rows of a detached partition"))?;
    Ok(row.get(0))
}

/// What the publication says of each table beyond listing it, as far as a
/// change of it changes the rows or columns that should be in ClickHouse
/// without a change message (ARCHITECTURE.md invariant 7).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublicationShape {
    /// Column lists and row filters ([`narrowings`]; Postgres 15+).
    pub narrowings: HashMap<TableName, sluice_postgres::publication::Narrowing>,
    /// Leaf partitions of tables published through their root
    /// ([`partition_leaves`]).
    pub leaves: HashMap<TableName, BTreeMap<u32, TableName>>,
    /// The OID of the `pg_publication_rel` entry that lists the table: a new
    /// one after `DROP TABLE` and `ADD TABLE`, so a table removed and added
    /// back shows. None for a table published `FOR ALL TABLES` or by schema.
    pub memberships: HashMap<TableName, u32>,
}

impl PublicationShape {
    /// Reads the shape of `publication`.
    pub async fn read(
        client: &tokio_postgres::Client,
        publication: &str,
    ) -> Result<PublicationShape, CatalogError> {
        let rows = client
            .query(
                "SELECT n.nspname::text, c.relname::text, pr.oid \
                 FROM pg_catalog.pg_publication_rel pr \
                 JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid \
                 JOIN pg_catalog.pg_class c ON c.oid = pr.prrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE p.pubname = $1",
                &[&publication],
            )
            .await
            .map_err(query_err("reading pg_publication_rel"))?;
        Ok(PublicationShape {
            narrowings: narrowings(client, publication).await?,
            leaves: partition_leaves(client, publication).await?,
            memberships: rows
                .iter()
                .map(|r| {
                    (
                        TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
                        r.get(2),
                    )
                })
                .collect(),
        })
    }

    /// A short, stable fingerprint of what the shape says of `table`
    /// (`v1::Relation::publication`): 16 hex digits of a 64-bit FNV-1a hash.
    pub fn fingerprint(&self, table: &TableName) -> String {
        let mut text = String::new();
        if let Some(oid) = self.memberships.get(table) {
            text.push_str(&format!("rel {oid}\n"));
        }
        if let Some((columns, filter)) = self.narrowings.get(table) {
            text.push_str(&format!(
                "columns {}\nfilter {}\n",
                columns.as_deref().unwrap_or("-"),
                filter.as_deref().unwrap_or("-")
            ));
        }
        if let Some(leaves) = self.leaves.get(table) {
            text.push_str("leaves");
            for oid in leaves.keys() {
                text.push_str(&format!(" {oid}"));
            }
        }
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("{hash:016x}")
    }
}

fn query_err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> CatalogError {
    move |source| CatalogError::Query { what, source }
}

/// One row of `pg_type`, the fields sluice needs.
#[derive(Debug, Clone)]
struct PgTypeRow {
    oid: u32,
    name: String,
    typtype: u8,
    typelem: u32,
    typbasetype: u32,
    typdelim: u8,
    /// `typoutput = array_out`: the true arrays. Not `typcategory = 'A'` alone,
    /// because int2vector and oidvector are in category A but print as
    /// space-separated lists without braces.
    is_array: bool,
}

/// Domains over domains are legal; bound the walk so a corrupt catalog cannot
/// loop forever.
const MAX_TYPE_CHAIN: usize = 32;

async fn fetch_type(
    client: &tokio_postgres::Client,
    type_oid: u32,
) -> Result<PgTypeRow, CatalogError> {
    let row = client
        .query_opt(
            "SELECT t.typname::text, t.typtype, t.typelem, t.typbasetype, t.typdelim, \
                    t.typoutput = 'array_out'::regproc \
             FROM pg_catalog.pg_type t WHERE t.oid = $1",
            &[&type_oid],
        )
        .await
        .map_err(query_err("reading pg_type"))?
        .ok_or(CatalogError::TypeNotFound { oid: type_oid })?;
    Ok(PgTypeRow {
        oid: type_oid,
        name: row.get(0),
        typtype: row.get::<_, i8>(1) as u8,
        typelem: row.get(2),
        typbasetype: row.get(3),
        typdelim: row.get::<_, i8>(4) as u8,
        is_array: row.get(5),
    })
}

/// Follows `typbasetype` until a non-domain type.
async fn strip_domains(
    client: &tokio_postgres::Client,
    mut row: PgTypeRow,
) -> Result<PgTypeRow, CatalogError> {
    let start = row.oid;
    for _ in 0..MAX_TYPE_CHAIN {
        if row.typtype != b'd' {
            return Ok(row);
        }
        row = fetch_type(client, row.typbasetype).await?;
    }
    Err(CatalogError::TypeChainTooDeep { oid: start })
}

fn category_of(scalar: &PgTypeRow) -> TypeCategory {
    if scalar.typtype == b'b' {
        TypeCategory::of_scalar_oid(scalar.oid)
    } else {
        TypeCategory::Text
    }
}

/// Cache of [`TypeInfo`] by OID for one source database.
///
/// Type OIDs are stable while a type exists; a type dropped and recreated gets
/// a new OID, so entries never go stale in a way that matters. Call
/// [`TypeCatalog::forget`] on a pgoutput Type/Relation message if in doubt.
#[derive(Debug, Default)]
pub struct TypeCatalog {
    types: HashMap<u32, TypeInfo>,
}

impl TypeCatalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// The cached type, if [`TypeCatalog::resolve`] has seen it.
    pub fn get(&self, type_oid: u32) -> Option<&TypeInfo> {
        self.types.get(&type_oid)
    }

    /// Adds (or replaces) an entry without asking Postgres.
    pub fn insert(&mut self, info: TypeInfo) {
        self.types.insert(info.oid, info);
    }

    /// Drops a cached entry so the next resolve re-reads it.
    pub fn forget(&mut self, type_oid: u32) {
        self.types.remove(&type_oid);
    }

    /// The type `type_oid`, from the cache or from `pg_type`.
    pub async fn resolve(
        &mut self,
        client: &tokio_postgres::Client,
        type_oid: u32,
    ) -> Result<&TypeInfo, CatalogError> {
        use std::collections::hash_map::Entry;
        match self.types.entry(type_oid) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => Ok(e.insert(Self::load(client, type_oid).await?)),
        }
    }

    /// Resolves the types of every column of `table`.
    pub async fn resolve_table(
        &mut self,
        client: &tokio_postgres::Client,
        table: &TableInfo,
    ) -> Result<(), CatalogError> {
        for column in &table.columns {
            self.resolve(client, column.type_oid).await?;
        }
        Ok(())
    }

    async fn load(
        client: &tokio_postgres::Client,
        type_oid: u32,
    ) -> Result<TypeInfo, CatalogError> {
        let top = fetch_type(client, type_oid).await?;
        let kind = match top.typtype {
            b'd' => v1::TypeKind::Domain,
            b'e' => v1::TypeKind::Enum,
            b'b' if top.is_array => v1::TypeKind::Array,
            b'b' => v1::TypeKind::Base,
            _ => v1::TypeKind::Other,
        };
        let base = strip_domains(client, top.clone()).await?;
        let (base_type_oid, category, array_delimiter) = if base.is_array && base.typelem != 0 {
            let element = fetch_type(client, base.typelem).await?;
            let delimiter = element.typdelim;
            let element_base = strip_domains(client, element).await?;
            let base_type_oid = if top.typtype == b'd' {
                base.oid
            } else {
                element_base.oid
            };
            (base_type_oid, category_of(&element_base), Some(delimiter))
        } else {
            (base.oid, category_of(&base), None)
        };
        Ok(TypeInfo {
            oid: type_oid,
            name: top.name,
            kind,
            base_type_oid,
            category,
            array_delimiter,
        })
    }
}

/// One column of a table, from `pg_attribute`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    /// `atttypid` (a domain's own OID for a domain column).
    pub type_oid: u32,
    /// `atttypmod`, -1 if none.
    pub type_modifier: i32,
    /// `format_type(atttypid, atttypmod)`, e.g. `numeric(10,2)`, `text[]`.
    pub type_name: String,
    pub nullable: bool,
    /// Part of the key rows are identified by (see [`table_columns`]).
    pub key: bool,
    /// Has a default, or a value for rows that predate it (`atthasdef OR
    /// atthasmissing`): see `v1::Column::has_default`.
    pub has_default: bool,
    /// `attnum`: the column's identity, kept across renames (see
    /// `v1::Column::attnum`).
    pub attnum: i16,
}

/// A table's columns and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    pub oid: u32,
    pub table: TableName,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    /// Columns in `attnum` order (dropped columns left out).
    pub columns: Vec<ColumnInfo>,
}

/// Reads the columns of `table` and decides its key columns:
/// - REPLICA IDENTITY DEFAULT: the primary key;
/// - USING INDEX: that index's columns;
/// - FULL: the primary key if there is one, else every column;
/// - NOTHING, or DEFAULT without a primary key: [`CatalogError::NoReplicaIdentity`].
pub async fn table_columns(
    client: &tokio_postgres::Client,
    table: &TableName,
) -> Result<TableInfo, CatalogError> {
    let not_found = || CatalogError::TableNotFound {
        table: table.clone(),
    };
    let rel = client
        .query_opt(
            "SELECT c.oid, c.relreplident FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(query_err("reading pg_class"))?
        .ok_or_else(not_found)?;
    let rel_oid: u32 = rel.get(0);
    let replica_identity = rel.get::<_, i8>(1) as u8 as char;

    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, \
                    pg_catalog.format_type(a.atttypid, a.atttypmod) \
                        || repeat('[]', greatest(a.attndims - 1, 0)), NOT a.attnotnull, \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = a.attrelid \
                            AND i.indisprimary AND a.attnum = ANY (i.indkey::int2[])), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = a.attrelid \
                            AND i.indisreplident AND a.attnum = ANY (i.indkey::int2[])), \
                    a.atthasdef OR a.atthasmissing, a.attnum \
             FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&rel_oid],
        )
        .await
        .map_err(query_err("reading pg_attribute"))?;

    let in_pk: Vec<bool> = rows.iter().map(|r| r.get(5)).collect();
    let in_ri_index: Vec<bool> = rows.iter().map(|r| r.get(6)).collect();
    let has_pk = in_pk.iter().any(|&k| k);
    let keys: Vec<bool> = match replica_identity {
        'd' if has_pk => in_pk,
        'i' if in_ri_index.iter().any(|&k| k) => in_ri_index,
        'f' if has_pk => in_pk,
        'f' => vec![true; rows.len()],
        _ => {
            return Err(CatalogError::NoReplicaIdentity {
                table: table.clone(),
            });
        }
    };

    let columns = rows
        .iter()
        .zip(keys)
        .map(|(r, key)| ColumnInfo {
            name: r.get(0),
            type_oid: r.get(1),
            type_modifier: r.get(2),
            type_name: r.get(3),
            nullable: r.get(4),
            key,
            has_default: r.get(7),
            attnum: r.get(8),
        })
        .collect();
    Ok(TableInfo {
        oid: rel_oid,
        table: table.clone(),
        replica_identity,
        columns,
    })
}

pub use sluice_postgres::publication::PublishedView;

/// Keeps only the columns of `info` that `view` publishes (in `attnum` order).
pub fn restrict(view: &PublishedView, info: &mut TableInfo) {
    info.columns.retain(|c| view.publishes(&c.name));
}

/// The column list and row filter `publication` applies to `table`
/// ([`PublishedView`]). A table the publication does not list gets the
/// default view (every column, every row).
pub async fn published_view(
    client: &tokio_postgres::Client,
    publication: &str,
    table: &TableName,
) -> Result<PublishedView, CatalogError> {
    sluice_postgres::publication::published_view(client, publication, table)
        .await
        .map_err(query_err("reading pg_publication_tables"))
}

/// The tables published by `publication`, sorted.
pub async fn published_tables(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<Vec<TableName>, CatalogError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query_err("reading pg_publication"))?;
    if exists.is_none() {
        return Err(CatalogError::PublicationNotFound {
            publication: publication.to_owned(),
        });
    }
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_catalog.pg_publication_tables \
             WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await
        .map_err(query_err("reading pg_publication_tables"))?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// The wire-format description of `table`; every column type must have been
/// resolved in `types` first ([`TypeCatalog::resolve_table`]).
pub fn to_relation(table: &TableInfo, types: &TypeCatalog) -> Result<v1::Relation, CatalogError> {
    let columns = table
        .columns
        .iter()
        .map(|c| {
            let ty = types
                .get(c.type_oid)
                .ok_or(CatalogError::TypeNotResolved { oid: c.type_oid })?;
            Ok(v1::Column {
                name: c.name.clone(),
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
                type_name: c.type_name.clone(),
                nullable: c.nullable,
                key: c.key,
                type_kind: ty.kind as i32,
                base_type_oid: ty.base_type_oid,
                has_default: c.has_default,
                attnum: u32::try_from(c.attnum).unwrap_or(0),
                text_category: ty.category.to_wire() as i32,
                array_delimiter: ty.array_delimiter.map_or(0, u32::from),
            })
        })
        .collect::<Result<Vec<_>, CatalogError>>()?;
    Ok(v1::Relation {
        oid: table.oid,
        columns,
        replica_identity: table.replica_identity.to_string(),
        publication: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_of_builtin_oids() {
        assert_eq!(TypeCategory::of_scalar_oid(oid::INT8), TypeCategory::Int);
        assert_eq!(TypeCategory::of_scalar_oid(oid::JSONB), TypeCategory::Json);
        assert_eq!(TypeCategory::of_scalar_oid(869), TypeCategory::Text); // inet
    }

    #[test]
    fn a_fingerprint_changes_with_what_the_publication_says_of_the_table() {
        let t = TableName::new("public", "t");
        let mut shape = PublicationShape::default();
        let whole = shape.fingerprint(&t);
        assert_eq!(whole.len(), 16);
        assert_eq!(whole, PublicationShape::default().fingerprint(&t), "stable");
        shape.memberships.insert(t.clone(), 16_400);
        let listed = shape.fingerprint(&t);
        assert_ne!(listed, whole);
        shape.memberships.insert(t.clone(), 16_401);
        assert_ne!(shape.fingerprint(&t), listed, "removed and added back");
        shape
            .narrowings
            .insert(t.clone(), (Some("1 3".into()), None));
        let narrowed = shape.fingerprint(&t);
        shape
            .narrowings
            .insert(t.clone(), (Some("1 3".into()), Some("(id > 5)".into())));
        assert_ne!(shape.fingerprint(&t), narrowed);
        let before = shape.fingerprint(&t);
        shape
            .leaves
            .entry(t.clone())
            .or_default()
            .insert(16_500, TableName::new("public", "t_1"));
        assert_ne!(shape.fingerprint(&t), before);
        assert_eq!(
            shape.fingerprint(&TableName::new("public", "other")),
            whole,
            "other tables are untouched"
        );
    }

    #[test]
    fn relation_needs_resolved_types() {
        let table = TableInfo {
            oid: 42,
            table: TableName::new("public", "t"),
            replica_identity: 'd',
            columns: vec![ColumnInfo {
                name: "id".into(),
                type_oid: oid::INT4,
                type_modifier: -1,
                type_name: "integer".into(),
                nullable: false,
                key: true,
                has_default: false,
                attnum: 1,
            }],
        };
        let mut types = TypeCatalog::new();
        assert!(matches!(
            to_relation(&table, &types),
            Err(CatalogError::TypeNotResolved { oid: 23 })
        ));
        types.insert(TypeInfo::scalar(oid::INT4, "int4", TypeCategory::Int));
        let rel = to_relation(&table, &types).unwrap();
        assert_eq!(rel.replica_identity, "d");
        assert_eq!(rel.columns[0].type_kind, v1::TypeKind::Base as i32);
        assert_eq!(rel.columns[0].base_type_oid, oid::INT4);
        assert!(rel.columns[0].key);
    }

    #[test]
    fn published_view_keeps_listed_columns_in_table_order() {
        let column = |name: &str, key: bool| ColumnInfo {
            name: name.into(),
            type_oid: oid::INT4,
            type_modifier: -1,
            type_name: "integer".into(),
            nullable: !key,
            key,
            has_default: false,
            attnum: 1,
        };
        let mut table = TableInfo {
            oid: 42,
            table: TableName::new("public", "t"),
            replica_identity: 'd',
            columns: vec![
                column("id", true),
                column("ssn", false),
                column("name", false),
            ],
        };
        restrict(&PublishedView::default(), &mut table);
        assert_eq!(table.columns.len(), 3);
        assert_eq!(PublishedView::default().where_clause(), "");
        let view = PublishedView {
            columns: Some(vec!["name".into(), "id".into()]),
            row_filter: Some("(region = 'eu'::text)".into()),
        };
        restrict(&view, &mut table);
        let names: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "name"]);
        assert_eq!(view.where_clause(), " WHERE ((region = 'eu'::text))");
    }
}
