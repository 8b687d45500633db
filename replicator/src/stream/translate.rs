//! pgoutput changes into protobuf rows: the published tables as the stream
//! knows them (by relation OID, from Relation messages and the catalog), and
//! each Insert, Update and Delete tuple decoded into typed values.
//!
//! A value that does not parse as its column's type is sent as text rather
//! than dropping the row, and reported once per column (logs never carry the
//! value). A change for a relation not announced yet is an error
//! ([`StreamError::UnknownRelation`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use metrics::counter;
use sluice_broker::TableName;
use sluice_proto::v1;

use super::StreamError;
use crate::catalog::{self, CatalogError, TypeCatalog, TypeInfo};
use crate::metrics as m;
use crate::pgoutput::{self, LogicalMessage, OldTuple, TupleData, TupleValue};
use crate::replication::Lsn;
use sluice_proto::values;

/// A published table as the stream knows it.
pub(super) struct RelState {
    pub(super) table: TableName,
    pub(super) label: String,
    pub(super) relation: Arc<v1::Relation>,
    types: Vec<TypeInfo>,
    /// The table cannot be replicated (no key to deduplicate its rows by):
    /// its changes are not published ([`super::publication`]).
    pub(super) skip: bool,
    /// `sluice_published_rows_total{table}` per op (insert, update, delete),
    /// looked up once rather than per row.
    published_rows: [metrics::Counter; 3],
}

/// The stream's view of the published tables and their types.
pub(super) struct Translator {
    types: TypeCatalog,
    /// Tables of the publication that are replicated (kept up to date by
    /// [`super::publication`]).
    pub(super) published: HashSet<TableName>,
    /// By relation OID, looked up for every row.
    relations: HashMap<u32, RelState, foldhash::fast::RandomState>,
    /// `(table, column)` whose unparsable values were already reported.
    value_errors: HashSet<(String, String)>,
}

impl Translator {
    pub(super) fn new(types: TypeCatalog, published: HashSet<TableName>) -> Self {
        Translator {
            types,
            published,
            relations: HashMap::default(),
            value_errors: HashSet::new(),
        }
    }

    /// Whether `table` can be replicated (`Ok(Err(reason))` if not), its
    /// types resolved: [`catalog::replicable`].
    pub(super) async fn replicable(
        &mut self,
        client: &tokio_postgres::Client,
        table: &TableName,
    ) -> Result<Result<(), String>, StreamError> {
        Ok(catalog::replicable(client, table, &mut self.types).await?)
    }

    /// A Type message: the type may have changed, look it up again when used.
    pub(super) fn forget_type(&mut self, oid: u32) {
        self.types.forget(oid);
    }

    /// A Relation message: (re)describes the table from the catalog, or from
    /// the message itself when the catalog moved on since (later DDL).
    /// Returns the table and whether its relation has a key to deduplicate
    /// rows by.
    pub(super) async fn relation(
        &mut self,
        client: &tokio_postgres::Client,
        relation: pgoutput::Relation,
    ) -> Result<(TableName, bool), StreamError> {
        let table = TableName::new(&relation.namespace, &relation.name);
        let info = catalog::table_columns(client, &table).await;
        let mut types = Vec::with_capacity(relation.columns.len());
        for column in &relation.columns {
            types.push(self.types.resolve(client, column.type_oid).await?.clone());
        }
        let v1_relation = match info {
            Ok(info) if same_layout(&info, &relation) => {
                self.types.resolve_table(client, &info).await?;
                catalog::to_relation(&info, &self.types)?
            }
            Ok(info) => {
                // The catalog moved on since this change was written (later
                // DDL): describe the columns from the message itself, with
                // what the catalog still knows of them.
                message_relation(&relation, &types, Some(&info))
            }
            Err(CatalogError::TableNotFound { .. })
            | Err(CatalogError::NoReplicaIdentity { .. }) => {
                message_relation(&relation, &types, None)
            }
            Err(error) => return Err(error.into()),
        };
        let keyed = v1_relation.columns.iter().any(|c| c.key);
        self.register(relation.oid, table.clone(), v1_relation, types);
        Ok((table, keyed))
    }

    /// Records a described table under its relation OID.
    fn register(
        &mut self,
        oid: u32,
        table: TableName,
        relation: v1::Relation,
        types: Vec<TypeInfo>,
    ) {
        let label = table.to_string();
        self.relations.insert(
            oid,
            RelState {
                published_rows: ["insert", "update", "delete"]
                    .map(|op| counter!(m::PUBLISHED_ROWS, "table" => label.clone(), "op" => op)),
                table,
                label,
                relation: Arc::new(relation),
                types,
                skip: false,
            },
        );
    }

    /// Marks the changes of relation `oid` as skipped (or not).
    pub(super) fn set_skip(&mut self, oid: u32, skip: bool) {
        if let Some(rel) = self.relations.get_mut(&oid) {
            rel.skip = skip;
        }
    }

    /// The table a relation OID stands for.
    pub(super) fn table(&self, oid: u32, lsn: Lsn) -> Result<&RelState, StreamError> {
        self.relations
            .get(&oid)
            .ok_or(StreamError::UnknownRelation { oid, lsn })
    }

    /// The row of an Insert, Update or Delete with its table (counted as
    /// published); `None` for other messages.
    pub(super) fn row(
        &mut self,
        lsn: Lsn,
        message: &LogicalMessage,
    ) -> Result<Option<(&RelState, v1::Row)>, StreamError> {
        let (oid, op, new, old) = match message {
            LogicalMessage::Insert(insert) => {
                (insert.relation_oid, v1::Op::Insert, &insert.new, None)
            }
            LogicalMessage::Update(update) => (
                update.relation_oid,
                v1::Op::Update,
                &update.new,
                update.old.as_ref().map(OldTuple::tuple),
            ),
            LogicalMessage::Delete(delete) => (
                delete.relation_oid,
                v1::Op::Delete,
                delete.old.tuple(),
                None,
            ),
            _ => return Ok(None),
        };
        if self.table(oid, lsn)?.skip {
            return Ok(None);
        }
        let values = self.tuple(oid, lsn, new)?;
        let old_key = match old {
            Some(old) => self.tuple(oid, lsn, old)?,
            None => Vec::new(),
        };
        let rel = self.table(oid, lsn)?;
        let op_index = match op {
            v1::Op::Insert => 0,
            v1::Op::Update => 1,
            _ => 2,
        };
        rel.published_rows[op_index].increment(1);
        let row = v1::Row {
            op: op as i32,
            values,
            old_key,
        };
        Ok(Some((rel, row)))
    }

    /// A tuple's values, typed by the relation's columns.
    fn tuple(
        &mut self,
        oid: u32,
        lsn: Lsn,
        tuple: &TupleData,
    ) -> Result<Vec<v1::Value>, StreamError> {
        let Some(rel) = self.relations.get(&oid) else {
            return Err(StreamError::UnknownRelation { oid, lsn });
        };
        let mut values = Vec::with_capacity(tuple.len());
        for (i, cell) in tuple.iter().enumerate() {
            let value = match cell {
                TupleValue::Null => values::null(),
                TupleValue::UnchangedToast => values::unchanged_toast(),
                TupleValue::Text(bytes) | TupleValue::Binary(bytes) => {
                    let text = String::from_utf8_lossy(bytes);
                    match rel.types.get(i) {
                        Some(ty) => match values::decode_text(ty, &text) {
                            Ok(value) => value,
                            Err(error) => {
                                // Keep the value as text rather than drop the
                                // row; report the column once.
                                let column = rel
                                    .relation
                                    .columns
                                    .get(i)
                                    .map(|c| c.name.clone())
                                    .unwrap_or_default();
                                if self
                                    .value_errors
                                    .insert((rel.label.clone(), column.clone()))
                                {
                                    tracing::error!(table = %rel.label, column = %column, error = %error, "value does not parse as its type; sent as text");
                                }
                                counter!(m::VALUE_DECODE_ERRORS, "table" => rel.label.clone())
                                    .increment(1);
                                v1::Value {
                                    kind: Some(v1::value::Kind::Text(text.into_owned())),
                                }
                            }
                        },
                        None => v1::Value {
                            kind: Some(v1::value::Kind::Text(text.into_owned())),
                        },
                    }
                }
            };
            values.push(value);
        }
        Ok(values)
    }
}

/// Whether the catalog's columns are the ones the Relation message lists.
fn same_layout(info: &catalog::TableInfo, relation: &pgoutput::Relation) -> bool {
    info.columns.len() == relation.columns.len()
        && info
            .columns
            .iter()
            .zip(&relation.columns)
            .all(|(a, b)| a.name == b.name && a.type_oid == b.type_oid)
}

/// The relation as the Relation message describes it (key columns from its
/// flags; nullability unknown, so every non-key column is nullable).
fn message_relation(
    relation: &pgoutput::Relation,
    types: &[TypeInfo],
    catalog: Option<&catalog::TableInfo>,
) -> v1::Relation {
    v1::Relation {
        oid: relation.oid,
        replica_identity: char::from(relation.replica_identity).to_string(),
        publication: String::new(),
        columns: relation
            .columns
            .iter()
            .zip(types)
            .map(|(c, t)| {
                // A column the catalog no longer has (renamed or dropped
                // since) may have had a default: say so, the loader then
                // reloads rather than add it empty. (Without a catalog entry
                // at all the table is gone, and no reload could help.)
                let known = catalog.map(|info| info.columns.iter().find(|k| k.name == c.name));
                let has_default = known.is_some_and(|k| k.is_none_or(|k| k.has_default));
                // The catalog's column of that name is, but for a column
                // dropped and re-added under its name since, the same one.
                let attnum = known
                    .flatten()
                    .and_then(|k| u32::try_from(k.attnum).ok())
                    .unwrap_or(0);
                v1::Column {
                    array_delimiter: t.array_delimiter.map_or(0, u32::from),
                    text_category: t.category.to_wire() as i32,
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    type_modifier: c.type_modifier,
                    type_name: t.name.clone(),
                    nullable: !c.key,
                    key: c.key,
                    type_kind: t.kind as i32,
                    base_type_oid: t.base_type_oid,
                    has_default,
                    attnum,
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use v1::value::Kind;

    use super::*;
    use crate::catalog::TypeCategory;
    use crate::pgoutput::{Delete, Insert, RelationColumn, Update};

    const OID: u32 = 16_384;

    fn message() -> pgoutput::Relation {
        let column = |name: &str, type_oid, key| RelationColumn {
            key,
            name: name.to_owned(),
            type_oid,
            type_modifier: -1,
        };
        pgoutput::Relation {
            xid: None,
            oid: OID,
            namespace: "public".to_owned(),
            name: "t".to_owned(),
            replica_identity: b'd',
            columns: vec![column("id", 20, true), column("note", 25, false)],
        }
    }

    fn types() -> Vec<TypeInfo> {
        vec![
            TypeInfo::scalar(20, "int8", TypeCategory::Int),
            TypeInfo::scalar(25, "text", TypeCategory::Text),
        ]
    }

    fn translator() -> Translator {
        let mut t = Translator::new(TypeCatalog::new(), HashSet::new());
        let relation = message_relation(&message(), &types(), None);
        t.register(OID, TableName::new("public", "t"), relation, types());
        t
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn kinds(values: &[v1::Value]) -> Vec<Option<Kind>> {
        values.iter().map(|v| v.kind.clone()).collect()
    }

    #[test]
    fn inserts_decode_their_values_by_column_type() {
        let mut t = translator();
        let insert = LogicalMessage::Insert(Insert {
            xid: None,
            relation_oid: OID,
            new: vec![text("42"), TupleValue::Null],
        });
        let (rel, row) = t.row(Lsn(1), &insert).unwrap().unwrap();
        assert_eq!(rel.table, TableName::new("public", "t"));
        assert_eq!(row.op, v1::Op::Insert as i32);
        assert_eq!(
            kinds(&row.values),
            [Some(Kind::Int(42)), values::null().kind]
        );
        assert!(row.old_key.is_empty());
    }

    #[test]
    fn updates_carry_the_old_key_and_unchanged_toast() {
        let mut t = translator();
        let update = LogicalMessage::Update(Update {
            xid: None,
            relation_oid: OID,
            old: Some(OldTuple::Key(vec![text("1"), TupleValue::Null])),
            new: vec![text("2"), TupleValue::UnchangedToast],
        });
        let (_, row) = t.row(Lsn(1), &update).unwrap().unwrap();
        assert_eq!(row.op, v1::Op::Update as i32);
        assert_eq!(
            kinds(&row.values),
            [Some(Kind::Int(2)), values::unchanged_toast().kind]
        );
        assert_eq!(kinds(&row.old_key)[0], Some(Kind::Int(1)));
    }

    #[test]
    fn deletes_send_the_old_tuple_as_values() {
        let mut t = translator();
        let delete = LogicalMessage::Delete(Delete {
            xid: None,
            relation_oid: OID,
            old: OldTuple::Full(vec![text("7"), text("gone")]),
        });
        let (_, row) = t.row(Lsn(1), &delete).unwrap().unwrap();
        assert_eq!(row.op, v1::Op::Delete as i32);
        assert_eq!(
            kinds(&row.values),
            [Some(Kind::Int(7)), Some(Kind::Text("gone".to_owned()))]
        );
        assert!(row.old_key.is_empty());
    }

    #[test]
    fn a_value_that_does_not_parse_is_sent_as_text() {
        let mut t = translator();
        let insert = LogicalMessage::Insert(Insert {
            xid: None,
            relation_oid: OID,
            new: vec![text("not a number"), text("x")],
        });
        let (_, row) = t.row(Lsn(1), &insert).unwrap().unwrap();
        assert_eq!(
            kinds(&row.values)[0],
            Some(Kind::Text("not a number".to_owned()))
        );
        assert!(
            t.value_errors
                .contains(&("public.t".to_owned(), "id".to_owned()))
        );
    }

    #[test]
    fn a_change_before_its_relation_is_an_error() {
        let mut t = translator();
        let insert = LogicalMessage::Insert(Insert {
            xid: None,
            relation_oid: OID + 1,
            new: vec![text("1")],
        });
        assert!(matches!(
            t.row(Lsn(9), &insert),
            Err(StreamError::UnknownRelation { oid, lsn: Lsn(9) }) if oid == OID + 1
        ));
        // Other messages are not rows.
        assert!(matches!(
            t.row(Lsn(9), &LogicalMessage::StreamStop),
            Ok(None)
        ));
    }

    #[test]
    fn relations_from_the_message_key_and_type_their_columns() {
        let relation = message_relation(&message(), &types(), None);
        assert_eq!(relation.oid, OID);
        assert_eq!(relation.replica_identity, "d");
        let columns: Vec<_> = relation
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.type_name.as_str(), c.key, c.nullable))
            .collect();
        assert_eq!(
            columns,
            [("id", "int8", true, false), ("note", "text", false, true)]
        );
    }
}
