//! The loader's ClickHouse layer: type mapping ([`types`]), target tables and
//! their evolution ([`schema`]), RowBinary encoding ([`encode`]) and inserts
//! ([`insert`]), with errors typed by what to do next ([`error`]).

pub mod encode;
pub mod error;
pub mod insert;
pub mod schema;
pub mod types;

pub use error::{Error, ValueError};
pub use insert::{
    ClampCounts, CurrentRows, EncodedRows, InsertBuilder, InsertReport, ToastRequest, encode_key,
    fetch_current,
};
pub use schema::{
    EvolutionPlan, ExistingColumn, SchemaDrift, TargetColumn, TargetTable, current_columns,
    ensure_table, plan_evolution, quote_ident, target_table_name,
};
pub use types::{ChType, map_column};
