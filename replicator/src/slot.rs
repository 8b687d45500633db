//! What to do with the replication slot at start-up: resume from it, create
//! it, or recreate it because the chains it fed can no longer be continued
//! (WAL removed, slot dropped or failed over, or no record in the stream of
//! its initial snapshot). The decision is pure ([`check_usable`], [`decide`]);
//! `run` carries it out.

use crate::pg::{PgSettings, SlotState};
use crate::replication::{ReplicationClient, ReplicationError};

/// Longest replication slot name Postgres accepts (`NAMEDATALEN - 1`).
pub const MAX_SLOT_NAME: usize = 63;

/// The name of a temporary slot of this replicator: `{slot}{suffix}`
/// (`suffix` such as `_continue` or `_resync_<µs>`), kept within
/// [`MAX_SLOT_NAME`]. When it would be longer, `slot` is cut and its cut end
/// replaced by 8 hex digits of a hash of the whole name, so that two slots
/// sharing a long prefix still get different names. `slot` is lower-case
/// ASCII (the config checks it).
pub fn temporary_slot_name(slot: &str, suffix: &str) -> String {
    if slot.len() + suffix.len() <= MAX_SLOT_NAME {
        return format!("{slot}{suffix}");
    }
    // FNV-1a: stable across builds and versions, unlike std's hasher.
    let hash = slot.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let keep = MAX_SLOT_NAME.saturating_sub(suffix.len() + 8);
    let prefix: String = slot.chars().take(keep).collect();
    format!("{prefix}{hash:08x}{suffix}")
}

/// The slot exists but cannot be used by this replicator.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(
        "slot {slot} uses plugin {plugin:?}, not pgoutput; drop it or choose another `postgres.slot`"
    )]
    WrongPlugin {
        slot: String,
        plugin: Option<String>,
    },
    /// Another replicator streams from it (this one waits as a standby).
    #[error("slot {slot} is in use by another process (pid {pid:?})")]
    Busy { slot: String, pid: Option<i32> },
    /// A slot of that name exists on the server, but not for this database:
    /// slot names are server-wide, so another source (or a physical
    /// standby) has it.
    #[error(
        "slot {slot} already exists on this server as {}; slot names are server-wide: give this source its own `postgres.slot`",
        owner_of(.database.as_deref())
    )]
    OtherDatabase {
        slot: String,
        /// `None` for a physical slot.
        database: Option<String>,
    },
}

fn owner_of(database: Option<&str>) -> String {
    match database {
        Some(database) => format!("a slot of another database ({database:?})"),
        None => "a physical replication slot".to_owned(),
    }
}

/// Whether an existing slot can be used at all: it must be a pgoutput slot
/// that no other process is streaming from.
pub fn check_usable(slot: &str, state: Option<&SlotState>) -> Result<(), SlotError> {
    let Some(existing) = state else {
        return Ok(());
    };
    if existing.plugin.as_deref() != Some("pgoutput") {
        return Err(SlotError::WrongPlugin {
            slot: slot.to_owned(),
            plugin: existing.plugin.clone(),
        });
    }
    if let Some(pid) = existing.active_pid {
        return Err(SlotError::Busy {
            slot: slot.to_owned(),
            pid: Some(pid),
        });
    }
    Ok(())
}

/// How streaming starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The slot exists and the stream recorded its snapshot: resume from its
    /// confirmed LSN, each chain after its last package.
    Resume,
    /// The slot exists, its initial snapshot did not complete, and the stream
    /// holds that snapshot's progress record (its generation is the slot's
    /// consistent point, where the slot still stands): read what is missing
    /// under a new exported snapshot, keeping the slot and the chains.
    ContinueSnapshot,
    /// First start: create the slot and snapshot every table (reason `initial`).
    Create,
    /// The slot cannot be continued: (drop and) create it, then snapshot
    /// every table again (reason `slot_lost`).
    Recreate(SlotLost),
}

/// Why a slot cannot be continued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotLost {
    /// `wal_status = lost`: `max_slot_wal_keep_size` removed WAL it needed.
    Invalidated,
    /// The slot exists but no heartbeat in the stream confirms a finished
    /// initial snapshot (or the stream lost everything).
    NoSnapshotRecord,
    /// The stream has heartbeats but the slot is gone (dropped, or a failover
    /// to a server without it).
    Gone,
}

impl SlotLost {
    /// Whether the old slot is still there and must be dropped first.
    pub fn must_drop(self) -> bool {
        !matches!(self, SlotLost::Gone)
    }

    /// Says what happened and what is done about it.
    pub fn log(self, slot: &str) {
        match self {
            SlotLost::Invalidated => {
                tracing::error!(slot = %slot, "slot was invalidated (WAL removed, max_slot_wal_keep_size); recreating it and resyncing every table");
            }
            SlotLost::NoSnapshotRecord => {
                tracing::warn!(slot = %slot, "slot exists but the stream has no record of its snapshot; recreating the slot and snapshotting every table");
            }
            SlotLost::Gone => {
                tracing::error!(slot = %slot, "slot is gone (dropped or failed over); recreating it and resyncing every table");
            }
        }
    }
}

/// Decides how to start from the slot (if it exists), whether the stream
/// holds a heartbeat (written once the initial snapshot is complete) and
/// the generation of the last snapshot progress record, if any.
pub fn decide(
    state: Option<&SlotState>,
    has_heartbeat: bool,
    snapshot_record: Option<u64>,
) -> Start {
    match state {
        Some(existing) if existing.wal_status.as_deref() == Some("lost") => {
            Start::Recreate(SlotLost::Invalidated)
        }
        Some(existing) if !has_heartbeat && snapshot_record == Some(existing.confirmed_flush.0) => {
            Start::ContinueSnapshot
        }
        Some(_) if !has_heartbeat => Start::Recreate(SlotLost::NoSnapshotRecord),
        Some(_) => Start::Resume,
        None if has_heartbeat => Start::Recreate(SlotLost::Gone),
        None => Start::Create,
    }
}

/// Drops the slot over a replication connection (waiting for a walsender
/// that still holds it).
pub async fn drop_slot(
    repl_config: &tokio_postgres::Config,
    settings: &PgSettings,
    slot: &str,
) -> Result<(), ReplicationError> {
    let mut client = ReplicationClient::connect_with_tls(repl_config, &settings.tls).await?;
    client.drop_slot(slot, true).await?;
    client.close().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_slot_names_fit_postgres_and_stay_apart() {
        assert_eq!(
            temporary_slot_name("sluice", "_continue"),
            "sluice_continue"
        );
        let suffix = "_resync_1764900000000000";
        let a = "a".repeat(63);
        let b = format!("{}b", "a".repeat(62));
        let (ta, tb) = (
            temporary_slot_name(&a, suffix),
            temporary_slot_name(&b, suffix),
        );
        assert_eq!(ta.len(), MAX_SLOT_NAME);
        assert!(
            ta.starts_with(&"a".repeat(31)) && ta.ends_with(suffix),
            "{ta}"
        );
        assert_ne!(ta, tb);
        let exact = "x".repeat(63 - suffix.len());
        assert_eq!(
            temporary_slot_name(&exact, suffix),
            format!("{exact}{suffix}")
        );
        assert!(
            temporary_slot_name(&a, "_continue")
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
    }
    use crate::replication::Lsn;

    fn slot(plugin: &str, active_pid: Option<i32>, wal_status: &str) -> SlotState {
        SlotState {
            plugin: Some(plugin.to_owned()),
            active_pid,
            confirmed_flush: Lsn(0x100),
            restart: Lsn(0x80),
            wal_status: Some(wal_status.to_owned()),
        }
    }

    #[test]
    fn an_existing_slot_with_a_recorded_snapshot_resumes() {
        let s = slot("pgoutput", None, "reserved");
        assert_eq!(decide(Some(&s), true, None), Start::Resume);
        let s = slot("pgoutput", None, "extended");
        assert_eq!(decide(Some(&s), true, None), Start::Resume);
    }

    #[test]
    fn an_unfinished_snapshot_with_its_progress_record_continues() {
        let s = slot("pgoutput", None, "reserved");
        assert_eq!(
            decide(Some(&s), false, Some(0x100)),
            Start::ContinueSnapshot
        );
        // A record of another slot's snapshot (an older one): start over.
        assert_eq!(
            decide(Some(&s), false, Some(0x80)),
            Start::Recreate(SlotLost::NoSnapshotRecord)
        );
        // Complete (heartbeat) or lost: the record does not matter.
        assert_eq!(decide(Some(&s), true, Some(0x100)), Start::Resume);
        let lost = slot("pgoutput", None, "lost");
        assert_eq!(
            decide(Some(&lost), false, Some(0x100)),
            Start::Recreate(SlotLost::Invalidated)
        );
        assert_eq!(decide(None, false, Some(0x100)), Start::Create);
    }

    #[test]
    fn no_slot_and_no_heartbeat_is_a_first_start() {
        assert_eq!(decide(None, false, None), Start::Create);
    }

    #[test]
    fn lost_slots_are_recreated() {
        let lost = slot("pgoutput", None, "lost");
        for heartbeat in [true, false] {
            assert_eq!(
                decide(Some(&lost), heartbeat, None),
                Start::Recreate(SlotLost::Invalidated)
            );
        }
        let fine = slot("pgoutput", None, "reserved");
        assert_eq!(
            decide(Some(&fine), false, None),
            Start::Recreate(SlotLost::NoSnapshotRecord)
        );
        assert_eq!(decide(None, true, None), Start::Recreate(SlotLost::Gone));
        assert!(SlotLost::Invalidated.must_drop());
        assert!(SlotLost::NoSnapshotRecord.must_drop());
        assert!(!SlotLost::Gone.must_drop());
    }

    #[test]
    fn only_free_pgoutput_slots_are_usable() {
        assert!(check_usable("s", None).is_ok());
        assert!(check_usable("s", Some(&slot("pgoutput", None, "reserved"))).is_ok());
        assert!(matches!(
            check_usable("s", Some(&slot("test_decoding", None, "reserved"))),
            Err(SlotError::WrongPlugin { plugin: Some(p), .. }) if p == "test_decoding"
        ));
        assert!(matches!(
            check_usable("s", Some(&slot("pgoutput", Some(42), "reserved"))),
            Err(SlotError::Busy { pid: Some(42), .. })
        ));
        // The plugin is checked first: a busy slot of another plugin is wrong.
        assert!(matches!(
            check_usable("s", Some(&slot("wal2json", Some(42), "reserved"))),
            Err(SlotError::WrongPlugin { .. })
        ));
    }
}
