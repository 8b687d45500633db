//! How the loaders of one source share its tables (ARCHITECTURE.md
//! invariant 11): exactly one loader applies a table at a time, a dead
//! loader's tables move to the others within `loader.lease_ttl`, and a loader
//! that joins takes its share.
//!
//! Everything lives in one NATS KV bucket per source
//! ([`topology::loaders_bucket`], made by the replicator; NATS 2.9's KV with
//! compare-and-set writes is all it needs):
//!
//! - `member.<consumer>`: one key per running loader, named by its
//!   `loader.consumer`, rewritten every quarter of `lease_ttl` (a background
//!   task) with a value that names the process. A loader whose key has not
//!   changed for `lease_ttl`, as another loader observes it on its own clock,
//!   is dead. No clocks are compared across machines.
//! - `table.<hex schema>.<hex table>`: the lease of one table; its value is
//!   the consumer name of the loader that holds it. A lease is taken with a
//!   create (or a compare-and-set over a dead holder's revision), given up
//!   with a compare-and-set delete, and never renewed: it lasts as long as
//!   its holder's membership.
//!
//! Which loader should hold a table is rendezvous hashing of the table over
//! the live members: every loader computes the same answer from the same
//! members, and a loader that joins or leaves moves only its own share. A
//! loader gives a table up (at a batch boundary, after its positions were
//! written) when it is someone else's, and takes one that is its own when the
//! lease is free or its holder dead.
//!
//! A loader stops applying when its membership could not be renewed for three
//! quarters of `lease_ttl` (measured from when the last successful renewal was
//! sent), before any other loader can see it dead. An INSERT already running
//! then may still finish: applying twice is harmless (ARCHITECTURE.md
//! invariant 2), the lease keeps per-table order and the work divided.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::TryStreamExt as _;
use sluice_broker::TableName;
use sluice_broker::config::Config;
use sluice_broker::topology;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Errors of the sharing protocol.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error(
        "the loaders' key-value bucket {bucket} is not there (the replicator creates it with the stream)"
    )]
    Bucket {
        bucket: String,
        #[source]
        source: jetstream::context::KeyValueError,
    },
    #[error("key-value {what} on bucket {bucket} failed")]
    Kv {
        what: &'static str,
        bucket: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "another loader started with loader.consumer = {consumer:?} and took this one's place; \
         every loader of a source needs its own loader.consumer"
    )]
    Replaced { consumer: String },
    #[error(
        "this loader could not renew its membership for {since:?} (NATS unreachable?); \
         it stops applying before the other loaders take its tables"
    )]
    Expired { since: Duration },
}

/// What the renewal task and the loader share.
#[derive(Debug)]
struct Heart {
    /// When the last successful renewal was sent.
    renewed: Mutex<Instant>,
    /// Another process wrote this loader's membership key.
    replaced: std::sync::atomic::AtomicBool,
}

/// A member as this loader observes it.
#[derive(Debug, Clone, Copy)]
struct Observed {
    revision: u64,
    /// Since when (this loader's clock) the key has had that revision.
    since: Instant,
}

/// This loader's part in sharing its source's tables.
pub struct Share {
    kv: kv::Store,
    bucket: String,
    me: String,
    ttl: Duration,
    heart: Arc<Heart>,
    stop_renewing: CancellationToken,
    members: HashMap<String, Observed>,
    /// Leases this loader holds, with their revisions.
    held: HashMap<TableName, u64>,
    /// Every table this loader has heard of.
    known: HashSet<TableName>,
    next_rebalance: Instant,
}

/// How a lease was taken (for the log: either way the table is read again
/// from the first message its positions do not cover).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// From nobody, or from a loader that stopped renewing its membership.
    Fresh,
    /// It named this loader already: held before a restart.
    Kept,
}

/// The outcome of a [`Share::rebalance`].
#[derive(Debug, Default)]
pub struct Rebalanced {
    pub taken: Vec<TableName>,
    pub given_up: Vec<TableName>,
}

/// The value that names this process in its membership key (a restart of
/// the run loop inside one process keeps it).
fn incarnation() -> &'static str {
    static INCARNATION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INCARNATION.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("{}-{nanos}", std::process::id())
    })
}

/// This process joined its source's loaders once: a later join (the run
/// restarting) that finds its name taken by another process gives way.
static JOINED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn member_key(consumer: &str) -> String {
    format!("{MEMBER_PREFIX}{consumer}")
}

/// How often a loader reads the members and moves tables at most: a loader
/// that joins gets its share within about twice this (the holder gives a
/// table up at its next rebalance, the joiner takes it at its own). Each
/// rebalance is one stream-info request and one read per member.
const REBALANCE_EVERY: Duration = Duration::from_millis(500);

const MEMBER_PREFIX: &str = "member.";
const TABLE_PREFIX: &str = "table.";

/// The lease key of a table: its names in hex, so any name makes a valid key.
pub fn lease_key(table: &TableName) -> String {
    fn hex(name: &str) -> String {
        name.bytes().map(|b| format!("{b:02x}")).collect()
    }
    format!("{TABLE_PREFIX}{}.{}", hex(&table.schema), hex(&table.name))
}

/// 64-bit FNV-1a followed by MurmurHash3's finalizer: stable across builds
/// and machines (every loader must compute the same owners). FNV-1a alone
/// mixes its last bytes poorly into the high bits, and the highest hash
/// wins: tables and loaders whose names differ only in their last character
/// all went to one loader.
fn hash(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &byte in *part {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        // Separates the parts: ("ab", "c") and ("a", "bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// The member that should apply `table`: rendezvous hashing (the member with
/// the highest hash of itself and the table; ties to the smaller name).
pub fn owner<'m>(table: &TableName, members: &'m [String]) -> Option<&'m str> {
    members
        .iter()
        .map(|m| {
            (
                hash(&[m.as_bytes(), table.schema.as_bytes(), table.name.as_bytes()]),
                m,
            )
        })
        .max_by(|(a, ma), (b, mb)| a.cmp(b).then_with(|| mb.cmp(ma)))
        .map(|(_, m)| m.as_str())
}

fn kv_error<'b, E>(what: &'static str, bucket: &'b str) -> impl FnOnce(E) -> ShareError + 'b
where
    E: std::error::Error + Send + Sync + 'static,
{
    move |source| ShareError::Kv {
        what,
        bucket: bucket.to_owned(),
        source: Box::new(source),
    }
}

impl Share {
    /// Joins the source's loaders: writes this loader's membership key (a
    /// loader started with the same `loader.consumer` earlier gives way: it
    /// notices at its next renewal and stops) and starts renewing it.
    pub async fn join(js: &jetstream::Context, config: &Config) -> Result<Share, ShareError> {
        let bucket = topology::loaders_bucket(config);
        let kv = js
            .get_key_value(&bucket)
            .await
            .map_err(|source| ShareError::Bucket {
                bucket: bucket.clone(),
                source,
            })?;
        let me = config.loader.consumer.clone();
        let key = member_key(&me);
        let sent = Instant::now();
        let revision = match kv.entry(&key).await.map_err(kv_error("read", &bucket))? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                if entry.value.as_ref() != incarnation().as_bytes() {
                    // This process joined before (its run restarts): another
                    // process took the name meanwhile, and keeps it.
                    if JOINED.load(std::sync::atomic::Ordering::SeqCst) {
                        return Err(ShareError::Replaced { consumer: me });
                    }
                    tracing::info!(consumer = %me, "a membership key of this loader's name exists (an earlier run of it, or another loader of the same name, which now stops)");
                }
                kv.update(
                    &key,
                    incarnation().as_bytes().to_vec().into(),
                    entry.revision,
                )
                .await
                .map_err(kv_error("update", &bucket))?
            }
            _ => kv
                .create(&key, incarnation().as_bytes().to_vec().into())
                .await
                .map_err(kv_error("create", &bucket))?,
        };
        JOINED.store(true, std::sync::atomic::Ordering::SeqCst);
        let heart = Arc::new(Heart {
            renewed: Mutex::new(sent),
            replaced: false.into(),
        });
        let stop_renewing = CancellationToken::new();
        tokio::spawn(renew(
            kv.clone(),
            key,
            revision,
            config.loader.lease_ttl,
            heart.clone(),
            stop_renewing.clone(),
        ));
        Ok(Share {
            kv,
            bucket,
            me,
            ttl: config.loader.lease_ttl,
            heart,
            stop_renewing,
            members: HashMap::new(),
            held: HashMap::new(),
            known: HashSet::new(),
            next_rebalance: Instant::now(),
        })
    }

    /// Whether this loader may apply: its membership was renewed recently
    /// enough that no other loader can take it for dead yet, and no other
    /// process took its name.
    pub fn check(&self) -> Result<(), ShareError> {
        if self
            .heart
            .replaced
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(ShareError::Replaced {
                consumer: self.me.clone(),
            });
        }
        let since = self
            .heart
            .renewed
            .lock()
            .map_or(Duration::MAX, |t| t.elapsed());
        if since > self.ttl * 3 / 4 {
            return Err(ShareError::Expired { since });
        }
        Ok(())
    }

    /// How many tables' leases this loader holds.
    pub fn tables_held(&self) -> usize {
        self.held.len()
    }

    /// Tables heard of (from the positions table, the stream's subjects or
    /// a batch); a new one makes the next [`Share::rebalance`] due at once.
    pub fn hear_of(&mut self, tables: impl IntoIterator<Item = TableName>) {
        for table in tables {
            if self.known.insert(table) {
                self.next_rebalance = Instant::now();
            }
        }
    }

    /// Whether [`Share::rebalance`] should run: [`REBALANCE_EVERY`] (or a
    /// quarter of `lease_ttl`, if shorter) passed, or a table was heard of.
    pub fn rebalance_due(&self) -> bool {
        Instant::now() >= self.next_rebalance
    }

    /// Reads the members, gives up the leases of tables that are someone
    /// else's now and takes those that are this loader's. Call it only
    /// between batches: a table given up must not be applied after it.
    pub async fn rebalance(&mut self) -> Result<Rebalanced, ShareError> {
        self.next_rebalance = Instant::now() + (self.ttl / 4).min(REBALANCE_EVERY);
        let live = self.live_members().await?;
        let mut out = Rebalanced::default();
        let mine = |table: &TableName| owner(table, &live) == Some(self.me.as_str());
        let give_up: Vec<(TableName, u64)> = self
            .held
            .iter()
            .filter(|(table, _)| !mine(table))
            .map(|(t, r)| (t.clone(), *r))
            .collect();
        let mut take: Vec<TableName> = self
            .known
            .iter()
            .filter(|table| !self.held.contains_key(*table) && mine(table))
            .cloned()
            .collect();
        take.sort();
        for (table, revision) in give_up {
            self.held.remove(&table);
            // Logged before the lease is deleted: from here on this loader
            // applies nothing to the table, and another may take it at once.
            tracing::info!(table = %table, "giving a table up to another loader");
            // A failure leaves the lease to be taken over once this loader
            // looks dead; nothing is applied to the table here meanwhile.
            if let Err(error) = self
                .kv
                .delete_expect_revision(lease_key(&table), Some(revision))
                .await
            {
                tracing::warn!(table = %table, error = %error, "could not give a table's lease up");
            }
            out.given_up.push(table);
        }
        for table in take {
            if let Some(taken) = self.take(&table, &live).await? {
                tracing::info!(table = %table, kept = (taken == Taken::Kept), "applying a table");
                out.taken.push(table);
            }
        }
        metrics::gauge!(crate::metrics::TABLES_HELD).set(self.held.len() as f64);
        Ok(out)
    }

    /// Takes `table`'s lease if it is free, names this loader, or names a
    /// loader that is not among the live ones.
    async fn take(
        &mut self,
        table: &TableName,
        live: &[String],
    ) -> Result<Option<Taken>, ShareError> {
        let key = lease_key(table);
        let value: bytes::Bytes = self.me.as_bytes().to_vec().into();
        let entry = self
            .kv
            .entry(&key)
            .await
            .map_err(kv_error("read", &self.bucket))?;
        let (taken, revision) = match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                if entry.value.as_ref() == self.me.as_bytes() {
                    (Taken::Kept, entry.revision)
                } else {
                    let holder = String::from_utf8_lossy(&entry.value).into_owned();
                    if live.contains(&holder) {
                        // It gives the table up at its next rebalance.
                        return Ok(None);
                    }
                    match self.kv.update(&key, value, entry.revision).await {
                        Ok(revision) => {
                            tracing::info!(table = %table, from = %holder, "took a table over from a loader that stopped renewing its membership");
                            (Taken::Fresh, revision)
                        }
                        Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                            return Ok(None);
                        }
                        Err(error) => return Err(kv_error("update", &self.bucket)(error)),
                    }
                }
            }
            _ => match self.kv.create(&key, value).await {
                Ok(revision) => (Taken::Fresh, revision),
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                    return Ok(None);
                }
                Err(error) => return Err(kv_error("create", &self.bucket)(error)),
            },
        };
        self.held.insert(table.clone(), revision);
        Ok(Some(taken))
    }

    /// The members taken for alive, sorted: this loader, and every other
    /// whose key changed within `lease_ttl` of this loader's observation.
    async fn live_members(&mut self) -> Result<Vec<String>, ShareError> {
        let subjects: Vec<(String, usize)> = self
            .kv
            .stream
            .info_with_subjects(format!("$KV.{}.{MEMBER_PREFIX}*", self.bucket))
            .await
            .map_err(kv_error("list members", &self.bucket))?
            .try_collect()
            .await
            .map_err(kv_error("list members", &self.bucket))?;
        let prefix = format!("$KV.{}.{MEMBER_PREFIX}", self.bucket);
        let now = Instant::now();
        let mut present = HashSet::new();
        for (subject, _) in subjects {
            let Some(name) = subject.strip_prefix(&prefix) else {
                continue;
            };
            if name == self.me {
                continue;
            }
            let entry = self
                .kv
                .entry(member_key(name))
                .await
                .map_err(kv_error("read", &self.bucket))?;
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                continue;
            };
            present.insert(name.to_owned());
            let observed = self.members.entry(name.to_owned()).or_insert(Observed {
                revision: entry.revision,
                since: now,
            });
            if observed.revision != entry.revision {
                *observed = Observed {
                    revision: entry.revision,
                    since: now,
                };
            }
        }
        self.members.retain(|name, _| present.contains(name));
        let mut live: Vec<String> = self
            .members
            .iter()
            .filter(|(_, o)| now.duration_since(o.since) < self.ttl)
            .map(|(name, _)| name.clone())
            .collect();
        live.push(self.me.clone());
        live.sort();
        metrics::gauge!(crate::metrics::LOADERS_LIVE).set(live.len() as f64);
        Ok(live)
    }

    /// Leaves on shutdown: gives every lease up and deletes the membership
    /// key, so that the other loaders take the tables at once instead of
    /// after `lease_ttl`. Call it only after the last batch was acked.
    pub async fn leave(mut self) {
        self.stop_renewing.cancel();
        // Logged before any lease is deleted: this loader applies nothing
        // more, and the others may take its tables from here on.
        tracing::info!(
            tables = self.held.len(),
            "leaving the source's loaders: its tables go to the others"
        );
        for (table, revision) in std::mem::take(&mut self.held) {
            let _ = self
                .kv
                .delete_expect_revision(lease_key(&table), Some(revision))
                .await;
        }
        let _ = self.kv.delete(member_key(&self.me)).await;
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.stop_renewing.cancel();
    }
}

/// Rewrites the membership key every quarter of `ttl` (compare-and-set on
/// its revision). A write refused because another process wrote the key
/// marks the loader replaced; other failures are retried at the next tick.
async fn renew(
    kv: kv::Store,
    key: String,
    mut revision: u64,
    ttl: Duration,
    heart: Arc<Heart>,
    stop: CancellationToken,
) {
    let every = ttl / 4;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let sent = Instant::now();
        let value: bytes::Bytes = incarnation().as_bytes().to_vec().into();
        match tokio::time::timeout(every, kv.update(&key, value, revision)).await {
            Ok(Ok(new)) => {
                revision = new;
                if let Ok(mut renewed) = heart.renewed.lock() {
                    *renewed = sent;
                }
            }
            Ok(Err(error)) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // Another process of the same name, or another loader that
                // took this one for dead and removed its key.
                match kv.entry(&key).await {
                    Ok(Some(entry))
                        if entry.operation == kv::Operation::Put
                            && entry.value.as_ref() != incarnation().as_bytes() =>
                    {
                        heart
                            .replaced
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                    _ => {
                        tracing::warn!(key = %key, "membership key changed under this loader; it stops applying and joins again");
                        return;
                    }
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(error = %error, "could not renew this loader's membership; retrying");
            }
            Err(_) => tracing::warn!("renewing this loader's membership timed out; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table whose lease `key` is: [`lease_key`] undone.
    fn table_of_lease_key(key: &str) -> Option<TableName> {
        fn unhex(hex: &str) -> Option<String> {
            if !hex.len().is_multiple_of(2) {
                return None;
            }
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            String::from_utf8(bytes).ok()
        }
        let (schema, name) = key.strip_prefix(TABLE_PREFIX)?.split_once('.')?;
        Some(TableName::new(&unhex(schema)?, &unhex(name)?))
    }

    #[test]
    fn lease_keys_are_valid_for_any_name_and_read_back() {
        for (schema, name) in [
            ("public", "orders"),
            ("Odd Schema", "with.dots and spaces"),
            ("ünï", "\"quoted\"*>%"),
        ] {
            let table = TableName::new(schema, name);
            let key = lease_key(&table);
            assert!(
                key.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_'),
                "{key}"
            );
            assert_eq!(table_of_lease_key(&key), Some(table));
        }
        assert_eq!(table_of_lease_key("member.x"), None);
        assert_eq!(table_of_lease_key("table.7.61"), None);
    }

    #[test]
    fn owners_spread_tables_and_move_only_the_share_of_a_member_that_comes_or_goes() {
        let tables: Vec<TableName> = (0..300)
            .map(|i| TableName::new("public", format!("t{i}")))
            .collect();
        let two = vec!["a".to_owned(), "b".to_owned()];
        let three = vec!["a".to_owned(), "b".to_owned(), "c".to_owned()];
        let count = |members: &[String], who: &str| {
            tables
                .iter()
                .filter(|t| owner(t, members) == Some(who))
                .count()
        };
        for who in ["a", "b"] {
            let n = count(&two, who);
            assert!((100..=200).contains(&n), "{who} owns {n} of 300");
        }
        for who in ["a", "b", "c"] {
            let n = count(&three, who);
            assert!((60..=140).contains(&n), "{who} owns {n} of 300");
        }
        // Adding `c` moves tables only to `c`.
        for table in &tables {
            let before = owner(table, &two).unwrap();
            let after = owner(table, &three).unwrap();
            assert!(
                after == before || after == "c",
                "{table}: {before} -> {after}"
            );
        }
        assert_eq!(owner(&tables[0], &[]), None);
    }

    #[test]
    fn the_hash_tells_the_parts_apart() {
        assert_ne!(hash(&[b"ab", b"c"]), hash(&[b"a", b"bc"]));
    }

    #[test]
    fn names_that_differ_in_their_last_character_spread_too() {
        let tables: Vec<TableName> = (0..100)
            .map(|i| TableName::new("public", format!("bench_t{i}")))
            .collect();
        for members in [["two_a", "two_b"], ["loader_1", "loader_2"], ["l1", "l2"]] {
            let members: Vec<String> = members.iter().map(|m| (*m).to_owned()).collect();
            let first = tables
                .iter()
                .filter(|t| owner(t, &members) == Some(members[0].as_str()))
                .count();
            assert!(
                (30..=70).contains(&first),
                "{members:?}: {first} of 100 to the first"
            );
        }
    }
}
