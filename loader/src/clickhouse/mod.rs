//! The loader's ClickHouse layer: type mapping ([`types`]), target tables and
//! their evolution ([`schema`]), RowBinary encoding ([`encode`]), inserts
//! ([`insert`]) and the TOAST fill-in read ([`toast`]), with typed errors
//! ([`error`]; what the loader does about them is [`crate::recovery`]'s).

pub mod encode;
pub mod error;
pub mod insert;
pub mod schema;
pub mod toast;
pub mod types;

pub use error::{Error, ResponseCode, ValueError};
pub use insert::{ClampCounts, EncodedRows, InsertBuilder, InsertReport, OpCounts};
pub use schema::{
    EvolutionPlan, ExistingColumn, SchemaDrift, TargetColumn, TargetTable, current_columns,
    ensure_table, plan_evolution, quote_ident, target_table_name,
};
pub use toast::{CurrentRows, ToastRequest, encode_key, fetch_current};
pub use types::{ChType, map_column};

/// A client for `config`'s server and user, with its INSERT compression.
/// Fails only when `password_file` cannot be read.
pub fn client(
    config: &sluice_broker::config::ClickHouseConfig,
) -> std::io::Result<::clickhouse::Client> {
    use secrecy::ExposeSecret;
    use sluice_broker::config::ClickHouseCompression;
    let compression = match config.compression {
        ClickHouseCompression::Lz4 => ::clickhouse::Compression::Lz4,
        ClickHouseCompression::None => ::clickhouse::Compression::None,
    };
    let mut client = ::clickhouse::Client::default()
        .with_url(&config.url)
        .with_user(&config.user)
        .with_compression(compression);
    if let Some(password) =
        sluice_broker::config::read_secret(&config.password, &config.password_file)?
    {
        client = client.with_password(password.expose_secret());
    }
    Ok(client)
}
