//! Ordinary SQL connections to the source (catalog queries, snapshots, slot
//! inspection), separate from the replication connection. Connecting (URL,
//! password, TLS) is the shared connector's job (`sluice_postgres`), so the
//! loader's `verify` connects exactly like the replicator.

pub use sluice_postgres::{PgError, PgSettings, SqlConn};

use crate::replication::Lsn;

/// Output styles pinned on every session whose values the value decoder
/// parses: the walsender and the backlog reader print values with their
/// session's settings (see `values`).
pub const OUTPUT_STYLES: &str = "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 -c bytea_output=hex -c lc_monetary=C -c timezone=UTC";

/// A row of `pg_replication_slots`.
#[derive(Debug, Clone, Default)]
pub struct SlotState {
    pub plugin: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Lsn,
    /// Where decoding restarts (0 when it has none).
    pub restart: Lsn,
    /// `lost` when `max_slot_wal_keep_size` invalidated the slot.
    pub wal_status: Option<String>,
}

/// Looks the slot up; `None` if it does not exist.
pub async fn slot_state(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotState>, PgError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, active_pid, confirmed_flush_lsn::text, wal_status, restart_lsn::text
               FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await
        .map_err(PgError::sql("cannot read pg_replication_slots"))?;
    let lsn = |row: &tokio_postgres::Row, i: usize| {
        row.get::<_, Option<String>>(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or(Lsn(0))
    };
    Ok(row.map(|row| SlotState {
        plugin: row.get(0),
        active_pid: row.get(1),
        confirmed_flush: lsn(&row, 2),
        restart: lsn(&row, 4),
        wal_status: row.get(3),
    }))
}

/// Where a slot named `slot` that is not this database's lives: `Some(Some(db))`
/// for another database's logical slot, `Some(None)` for a physical slot,
/// `None` when there is none (slot names are server-wide).
pub async fn slot_elsewhere(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<Option<String>>, PgError> {
    let row = client
        .query_opt(
            "SELECT database::text FROM pg_replication_slots
              WHERE slot_name = $1 AND database IS DISTINCT FROM current_database()",
            &[&slot],
        )
        .await
        .map_err(PgError::sql("cannot read pg_replication_slots"))?;
    Ok(row.map(|row| row.get(0)))
}

/// Takes this session's advisory lock of `slot` (keyed on the slot's name, in
/// this database), which no other replicator of the slot can then take: the
/// start-up steps (look at the slot, create, drop or recreate it, snapshot)
/// run in one replicator at a time. `Ok(None)` when taken (held until the
/// connection closes); `Ok(Some(pid))` when another session holds it (its
/// backend pid, when visible).
pub async fn try_lock_slot(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<Option<i32>>, PgError> {
    let row = client
        .query_one(
            "WITH k AS (SELECT hashtextextended($1, 0) AS key)
             SELECT pg_try_advisory_lock(key),
                    (SELECT l.pid FROM pg_locks l
                      WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                        AND l.classid::bigint = (key >> 32) & 4294967295
                        AND l.objid::bigint = key & 4294967295
                        AND l.pid <> pg_backend_pid()
                      LIMIT 1)
               FROM k",
            &[&format!("sluice-replicator slot {slot}")],
        )
        .await
        .map_err(PgError::sql("cannot take the slot's advisory lock"))?;
    Ok(if row.get::<_, bool>(0) {
        None
    } else {
        Some(row.get::<_, Option<i32>>(1))
    })
}

/// How far the server's WAL goes: the current write position on a primary,
/// what it has replayed on a standby (where decoding ends).
pub async fn current_wal_lsn(client: &tokio_postgres::Client) -> Result<Lsn, PgError> {
    let row = client
        .query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
        .await
        .map_err(PgError::sql(
            "cannot read pg_current_wal_lsn() (pg_last_wal_replay_lsn() on a standby)",
        ))?;
    let text: Option<String> = row.get(0);
    Ok(text.and_then(|t| t.parse().ok()).unwrap_or(Lsn(0)))
}
