//! JetStream topology of a source: the stream, its subjects and dedup IDs.
//!
//! - Data: `sluice.<source>.<schema>.<table>` (one subject per table, so the
//!   last package of a table can be read back by subject after a crash).
//! - Heartbeats: `sluice.<source>._control.heartbeat` (in the stream, so the
//!   loader measures lag when no table changes).
//! - Resync requests: `sluice.<source>._control.resync.request`, plain NATS
//!   request/reply; five tokens, so the stream (`sluice.<source>.*.*`) never
//!   captures them. Progress of a resync is announced on
//!   `sluice.<source>._control.resync.events` (JSON, also outside the stream).
//!
//! Names are escaped into subject tokens: bytes outside `[A-Za-z0-9_-]` become
//! `%HH`, so `public."Order Items"` cannot break or widen a subject.

use async_nats::jetstream::{self, stream};

use crate::config::Config;
use crate::table::TableName;

/// Schema name reserved for control subjects.
pub const CONTROL_TOKEN: &str = "_control";

/// Escapes a Postgres identifier into one subject token.
pub fn subject_token(name: &str) -> String {
    let mut token = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            token.push(char::from(byte));
        } else {
            token.push_str(&format!("%{byte:02X}"));
        }
    }
    token
}

/// Subject of a table's packages.
pub fn table_subject(source: &str, schema: &str, table: &str) -> String {
    format!(
        "sluice.{source}.{}.{}",
        subject_token(schema),
        subject_token(table)
    )
}

/// The name a subject token stands for: [`subject_token`] undone; `None`
/// for a token it cannot have made.
pub fn token_name(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut name = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = token.get(i + 1..i + 3)?;
            name.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            name.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(name).ok()
}

/// The table whose packages `subject` carries (`None` for a control subject
/// or another source's): [`table_subject`] undone.
pub fn table_of_subject(source: &str, subject: &str) -> Option<TableName> {
    let rest = subject.strip_prefix(&format!("sluice.{source}."))?;
    let (schema, table) = rest.split_once('.')?;
    if schema == CONTROL_TOKEN || table.contains('.') {
        return None;
    }
    Some(TableName::new(&token_name(schema)?, &token_name(table)?))
}

/// Subject of heartbeat packages.
pub fn heartbeat_subject(source: &str) -> String {
    format!("sluice.{source}.{CONTROL_TOKEN}.heartbeat")
}

/// Subject of the initial snapshot's progress records (in the stream; the
/// replicator reads the last one when it restarts mid-snapshot).
pub fn snapshot_progress_subject(source: &str) -> String {
    format!("sluice.{source}.{CONTROL_TOKEN}.snapshot")
}

/// Subject of the progress records of one table's resync (in the stream;
/// the replicator reads the last one when it restarts mid-resync). One
/// token after `_control`: `resync~<schema>~<table>`, the names escaped as
/// in [`table_subject`], whose tokens never hold a `~`.
pub fn resync_progress_subject(source: &str, schema: &str, table: &str) -> String {
    format!(
        "sluice.{source}.{CONTROL_TOKEN}.{RESYNC_PROGRESS_PREFIX}{}~{}",
        subject_token(schema),
        subject_token(table)
    )
}

/// What every resync progress subject's last token starts with.
const RESYNC_PROGRESS_PREFIX: &str = "resync~";

/// The table whose resync progress `subject` records: [`resync_progress_subject`] undone.
pub fn table_of_resync_progress_subject(source: &str, subject: &str) -> Option<TableName> {
    let rest = subject.strip_prefix(&format!(
        "sluice.{source}.{CONTROL_TOKEN}.{RESYNC_PROGRESS_PREFIX}"
    ))?;
    let (schema, table) = rest.split_once('~')?;
    if table.contains(['~', '.']) {
        return None;
    }
    Some(TableName::new(&token_name(schema)?, &token_name(table)?))
}

/// The filter of every resync progress subject's source (with the control
/// subjects, which [`table_of_resync_progress_subject`] tells apart).
pub fn control_subjects(source: &str) -> String {
    format!("sluice.{source}.{CONTROL_TOKEN}.*")
}

/// Subject the replicator answers resync requests on.
pub fn resync_request_subject(source: &str) -> String {
    format!("sluice.{source}.{CONTROL_TOKEN}.resync.request")
}

/// Subject of resync progress events (JSON, core NATS, outside the stream).
pub fn resync_events_subject(source: &str) -> String {
    format!("sluice.{source}.{CONTROL_TOKEN}.resync.events")
}

/// Subject filter of everything the stream holds for a source.
pub fn stream_subjects(source: &str) -> String {
    format!("sluice.{source}.*.*")
}

/// The KV bucket in which the loaders of a source share its tables (their
/// membership and one lease per table: `sluice-loader`'s `share` module).
/// Created by the replicator with the stream ([`ensure_stream`]), so that a
/// least-privilege loader needs no right to create streams.
pub fn loaders_bucket(config: &Config) -> String {
    let stream: String = config
        .stream_name()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{stream}_LOADERS")
}

/// The stream behind the loaders' bucket as [`ensure_stream`] creates it:
/// what NATS clients make of a KV bucket with the last value of each key
/// only (`KV_<bucket>`, subjects `$KV.<bucket>.>`, roll-ups, direct gets), on
/// file, with the stream's replicas. No `max_age`: a member's liveness is
/// judged by whether its key keeps changing. (Made as a stream because the
/// client's own bucket creation failed against NATS 2.9.10 with `data did
/// not match any variant of untagged enum Response`; it asks the server for
/// its account details first.)
pub fn loaders_bucket_stream_config(config: &Config) -> stream::Config {
    let bucket = loaders_bucket(config);
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(format!(
            "which sluice loader applies which table of source {}",
            config.source
        )),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        num_replicas: config.nats.replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// Subject for packages a loader could not decode or write (dead letters),
/// stored by the dead-letter stream ([`dead_letter_stream_name`]), not the data stream.
pub fn dead_letter_subject(source: &str) -> String {
    format!("sluice.{source}.{CONTROL_TOKEN}.dead.letter")
}

/// The deterministic `Nats-Msg-Id` of a change package: the same transaction
/// re-read after a restart yields the same IDs, so JetStream drops the resend.
pub fn change_msg_id(
    slot: &str,
    commit_lsn: u64,
    schema: &str,
    table: &str,
    package_index: u32,
) -> String {
    format!(
        "{slot}:{commit_lsn:X}:{}.{}:{package_index}",
        subject_token(schema),
        subject_token(table)
    )
}

/// The `Nats-Msg-Id` of a snapshot or resync package of a generation.
pub fn snapshot_msg_id(
    slot: &str,
    generation: u64,
    schema: &str,
    table: &str,
    sequence: u64,
) -> String {
    format!(
        "{slot}:g{generation:X}:{}.{}:{sequence}",
        subject_token(schema),
        subject_token(table)
    )
}

/// Name of the stream keeping a source's dead letters.
pub fn dead_letter_stream_name(stream: &str) -> String {
    format!("{stream}_DEAD_LETTERS")
}

/// Configuration of the dead-letter stream: same replicas and age as the data
/// stream, so an operator has time to inspect what was moved aside.
pub fn dead_letter_stream_config(config: &Config) -> stream::Config {
    stream::Config {
        name: dead_letter_stream_name(&config.stream_name()),
        subjects: vec![dead_letter_subject(&config.source)],
        storage: stream::StorageType::File,
        num_replicas: config.nats.replicas,
        max_age: config.nats.max_age,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// The stream configuration sluice wants for a source.
pub fn stream_config(config: &Config) -> stream::Config {
    stream::Config {
        name: config.stream_name(),
        subjects: vec![stream_subjects(&config.source)],
        storage: stream::StorageType::File,
        num_replicas: config.nats.replicas,
        duplicate_window: config.nats.duplicate_window,
        max_age: config.nats.max_age,
        max_bytes: config.nats.max_bytes,
        // Old data goes first: the loader sees the gap and resyncs, so a slow
        // consumer never backs WAL up into the primary.
        discard: stream::DiscardPolicy::Old,
        retention: stream::RetentionPolicy::Limits,
        allow_direct: true,
        ..Default::default()
    }
}

/// Errors while creating or checking the stream.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot create stream {stream}")]
    Create {
        stream: String,
        #[source]
        source: jetstream::context::CreateStreamError,
    },
    #[error("cannot read stream {stream}")]
    Info {
        stream: String,
        #[source]
        source: jetstream::context::GetStreamError,
    },
}

/// Creates the stream, or brings an existing one to the configured limits,
/// replicas and duplicate window.
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &Config,
) -> Result<stream::Stream, TopologyError> {
    // The streams beside the data stream: created once, never changed here.
    for beside in [
        dead_letter_stream_config(config),
        loaders_bucket_stream_config(config),
    ] {
        let name = beside.name.clone();
        js.get_or_create_stream(beside)
            .await
            .map_err(|source| TopologyError::Create {
                stream: name,
                source,
            })?;
    }
    let wanted = stream_config(config);
    let name = wanted.name.clone();
    let mut stream = js
        .get_or_create_stream(wanted.clone())
        .await
        .map_err(|source| TopologyError::Create {
            stream: name.clone(),
            source,
        })?;
    let current = stream
        .info()
        .await
        .map(|info| info.config.clone())
        .map_err(|e| TopologyError::Info {
            stream: name.clone(),
            source: jetstream::context::GetStreamError::with_source(
                jetstream::context::GetStreamErrorKind::Request,
                e,
            ),
        })?;
    if differs(&current, &wanted) {
        tracing::info!(stream = %name, "updating stream settings to the configuration");
        match js.update_stream(wanted.clone()).await {
            Ok(_) => {
                stream = js
                    .get_stream(&name)
                    .await
                    .map_err(|source| TopologyError::Info {
                        stream: name.clone(),
                        source,
                    })?;
            }
            // A least-privilege producer may create its stream but not change
            // it (shrinking `max_age` or `max_bytes` would amount to a purge):
            // the stream keeps its settings and an admin applies the new ones.
            Err(error) => tracing::warn!(
                stream = %name,
                error = %crate::error_chain(&error),
                differences = %describe_differences(&current, &wanted),
                "cannot update the stream to the configured settings (a least-privilege NATS user may not); \
                 it keeps its current ones until an admin applies them"
            ),
        }
    }
    Ok(stream)
}

/// `max_age: 1h -> 2h, replicas: 1 -> 3`: what [`differs`] found, for the log.
fn describe_differences(current: &stream::Config, wanted: &stream::Config) -> String {
    let mut out = Vec::new();
    let mut diff = |key: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{key}: {a} -> {b}"));
        }
    };
    diff(
        "subjects",
        current.subjects.join(","),
        wanted.subjects.join(","),
    );
    diff(
        "replicas",
        current.num_replicas.to_string(),
        wanted.num_replicas.to_string(),
    );
    diff(
        "duplicate_window",
        format!("{:?}", current.duplicate_window),
        format!("{:?}", wanted.duplicate_window),
    );
    diff(
        "max_age",
        format!("{:?}", current.max_age),
        format!("{:?}", wanted.max_age),
    );
    diff(
        "max_bytes",
        current.max_bytes.to_string(),
        wanted.max_bytes.to_string(),
    );
    diff(
        "discard",
        format!("{:?}", current.discard),
        format!("{:?}", wanted.discard),
    );
    out.join(", ")
}

fn differs(current: &stream::Config, wanted: &stream::Config) -> bool {
    current.subjects != wanted.subjects
        || current.num_replicas != wanted.num_replicas
        || current.duplicate_window != wanted.duplicate_window
        || current.max_age != wanted.max_age
        || current.max_bytes != wanted.max_bytes
        || current.discard != wanted.discard
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_escape_subject_syntax() {
        assert_eq!(subject_token("orders"), "orders");
        assert_eq!(subject_token("Order Items"), "Order%20Items");
        assert_eq!(subject_token("a.b*>"), "a%2Eb%2A%3E");
        assert_eq!(subject_token("zürich"), "z%C3%BCrich");
        assert_eq!(
            table_subject("app", "public", "a.b"),
            "sluice.app.public.a%2Eb"
        );
    }

    #[test]
    fn table_subjects_read_back_into_their_table() {
        for (schema, table) in [
            ("public", "orders"),
            ("Sales Dept", "Order.Items"),
            ("%41", "é*>"),
        ] {
            let subject = table_subject("src", schema, table);
            assert_eq!(
                table_of_subject("src", &subject),
                Some(TableName::new(schema, table))
            );
        }
        assert_eq!(table_of_subject("src", &heartbeat_subject("src")), None);
        assert_eq!(
            table_of_subject("other", &table_subject("src", "a", "b")),
            None
        );
        assert_eq!(table_of_subject("src", "sluice.src.a.%4"), None);
    }

    #[test]
    fn resync_progress_subjects_are_one_token_per_table_and_read_back() {
        let mut seen = std::collections::HashSet::new();
        for (schema, table) in [
            ("public", "orders"),
            ("public~x", "y"),
            ("public", "x~y"),
            ("Sales Dept", "Order.Items"),
            ("%41", "é*>"),
        ] {
            let subject = resync_progress_subject("src", schema, table);
            // In the stream (`sluice.src.*.*`), a control subject.
            assert_eq!(subject.split('.').count(), 4, "{subject}");
            assert!(subject.starts_with("sluice.src._control."), "{subject}");
            assert!(!subject.contains([' ', '*', '>']), "{subject}");
            assert!(seen.insert(subject.clone()), "two tables share {subject}");
            assert_eq!(table_of_subject("src", &subject), None);
            assert_eq!(
                table_of_resync_progress_subject("src", &subject),
                Some(TableName::new(schema, table))
            );
        }
        for other in [
            heartbeat_subject("src"),
            snapshot_progress_subject("src"),
            table_subject("src", "_control", "resync~a~b"),
            resync_progress_subject("other", "a", "b"),
        ] {
            assert_eq!(
                table_of_resync_progress_subject("src", &other),
                None,
                "{other}"
            );
        }
    }

    #[test]
    fn control_subjects_are_outside_or_inside_the_stream_as_intended() {
        let matches =
            |subject: &str| subject.split('.').count() == 4 && subject.starts_with("sluice.app.");
        assert!(matches(&heartbeat_subject("app")));
        assert!(matches(&table_subject("app", "s", "t")));
        assert!(!matches(&resync_request_subject("app")));
        assert!(!matches(&resync_events_subject("app")));
        assert!(!matches(&dead_letter_subject("app")));
    }

    #[test]
    fn dedup_ids_are_deterministic_and_distinct() {
        let a = change_msg_id("slot", 0x16B374D48, "public", "t", 0);
        assert_eq!(a, change_msg_id("slot", 0x16B374D48, "public", "t", 0));
        assert_ne!(a, change_msg_id("slot", 0x16B374D48, "public", "t", 1));
        assert_ne!(a, change_msg_id("slot", 0x16B374D48, "public", "u", 0));
        assert_ne!(a, change_msg_id("slot", 0x16B374D49, "public", "t", 0));
        assert_ne!(
            snapshot_msg_id("slot", 1, "p", "t", 1),
            snapshot_msg_id("slot", 2, "p", "t", 1)
        );
    }
}
