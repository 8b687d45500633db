//! What differs between the Postgres versions sluice supports (13 to 18), in
//! one place. Each difference is decided by the server's own
//! `server_version_num` (e.g. `130023` for 13.23), never by configuration.
//!
//! | since | what | who cares |
//! |---|---|---|
//! | 15 | `CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')`; before: `EXPORT_SNAPSHOT` | the replicator's replication connection |
//! | 15 | publication column lists and row filters (`pg_publication_tables.attnames`, `rowfilter`) | snapshots, resyncs, `verify` ([`crate::publication`]) |
//! | 15 | `CREATE PUBLICATION … FOR TABLES IN SCHEMA` | `sql/postgres/setup.sql` without `tables` |
//! | 14 | pgoutput `proto_version '2'` with `streaming 'on'` (transactions sent before they commit) | the replicator's `START_REPLICATION` |
//! | 17 | failover slots: `CREATE_REPLICATION_SLOT … (…, FAILOVER)`, synchronised to standbys that run `sync_replication_slots` | the replicator's slot |
//! | 17 | `interval` holds `±infinity` (the former extreme values) | the value decoder: carried as text |
//! | 14 | `numeric` holds `±Infinity` (13 refuses the literal) | `verify`'s clamp of `Decimal` columns |

/// The oldest Postgres sluice supports: 13 (`pg_replication_slots.wal_status`).
pub const OLDEST_SUPPORTED: i32 = 130000;

/// `current_setting('server_version_num')` of the server `client` is connected to.
pub async fn server_version_num(
    client: &tokio_postgres::Client,
) -> Result<i32, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0))
}

/// Whether `CREATE_REPLICATION_SLOT` takes the option list `(SNAPSHOT 'export')`
/// (15+). Before, only the keyword `EXPORT_SNAPSHOT`, which 15–18 still accept
/// as the legacy form.
pub fn has_create_slot_options(server_version_num: i32) -> bool {
    server_version_num >= 150000
}

/// Whether pgoutput streams transactions before they commit (protocol 2,
/// `streaming 'on'`; 14+).
pub fn has_streaming(server_version_num: i32) -> bool {
    server_version_num >= 140000
}

/// Whether a logical slot can be created as a failover slot, which standbys
/// running `sync_replication_slots` keep a copy of (17+).
pub fn has_failover_slots(server_version_num: i32) -> bool {
    server_version_num >= 170000
}

/// Whether publications have column lists and row filters (15+).
pub fn has_publication_column_lists(server_version_num: i32) -> bool {
    server_version_num >= 150000
}

/// Whether publications can publish a whole schema, `FOR TABLES IN SCHEMA` (15+).
pub fn has_publication_tables_in_schema(server_version_num: i32) -> bool {
    server_version_num >= 150000
}

/// Whether `numeric` has `Infinity` and `-Infinity` (14+).
pub fn has_numeric_infinity(server_version_num: i32) -> bool {
    server_version_num >= 140000
}

/// Whether `interval` has `infinity` and `-infinity` (17+), which take the
/// place of the largest and the smallest interval of earlier versions.
pub fn has_interval_infinity(server_version_num: i32) -> bool {
    server_version_num >= 170000
}

/// `13.23` for `130023` (the versions sluice supports number themselves
/// major × 10000 + minor).
pub fn label(server_version_num: i32) -> String {
    format!(
        "{}.{}",
        server_version_num / 10000,
        server_version_num % 10000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_decide_each_difference() {
        assert!(!has_create_slot_options(140023));
        assert!(has_create_slot_options(150000));
        assert!(!has_publication_column_lists(140023));
        assert!(has_publication_column_lists(180004));
        assert!(!has_publication_tables_in_schema(130023));
        assert!(has_publication_tables_in_schema(150018));
        assert!(!has_numeric_infinity(130023));
        assert!(has_numeric_infinity(140000));
        assert!(!has_interval_infinity(160014));
        assert!(has_interval_infinity(170000));
        assert_eq!(label(130023), "13.23");
        assert_eq!(label(180004), "18.4");
    }
}
