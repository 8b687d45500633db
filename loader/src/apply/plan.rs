//! The pure half of applying a batch: what each decoded package means for
//! its table, decided from the packages and the tables' chain state
//! ([`crate::chain`], ARCHITECTURE.md invariant 3) as data, without touching
//! ClickHouse or NATS. [`super::Loader::apply`] carries the [`Plan`] out.
//!
//! - A package that cannot be decoded, or has no chain position, is
//!   dead-lettered.
//! - A heartbeat only moves the lag clock.
//! - Replays (at or before the table's position) and packages of an older
//!   generation are skipped; so are packages of a blocked table that do not
//!   start a new chain.
//! - A gap blocks the table (never applies past it) and asks for a resync.
//! - Per table, in stream order: runs of consecutive row packages with the
//!   same relation become one [`Step::Insert`]; TRUNCATE, RESYNC_BEGIN and
//!   RESYNC_END split runs and take effect in order.

use std::collections::HashSet;

use sluice_broker::TableName;
use sluice_proto::v1;

use super::dead_letter::DeadLetter;
use super::decode::Decoded;
use crate::chain::{Chains, Position, Verdict};

/// What one batch does, table by table.
pub(super) struct Plan<'b> {
    /// Tables with packages to apply, in the order of their first one.
    pub(super) tables: Vec<TablePlan<'b>>,
    /// Commit time of the batch's last heartbeat.
    pub(super) heartbeat: Option<i64>,
    /// Messages that will never apply, in stream order.
    pub(super) dead_letters: Vec<DeadLetter>,
    /// Breaks found in tables' chains: each table is now blocked and needs
    /// a resync.
    pub(super) gaps: Vec<Gap>,
    /// Every table with a package in the batch, whatever its verdict.
    pub(super) seen: HashSet<TableName>,
}

/// One table's steps, in stream order.
pub(super) struct TablePlan<'b> {
    pub(super) table: TableName,
    pub(super) steps: Vec<Step<'b>>,
    /// Indexes of the batch messages of every applied package (dead-lettered
    /// together should the table's rows be refused).
    pub(super) messages: Vec<usize>,
    /// Whether the table's shadow gets snapshot rows (or is created) in this
    /// batch: the resync is making progress.
    pub(super) fills_shadow: bool,
    /// Commit LSN of the last applied package (stored with the position).
    pub(super) last_commit_lsn: u64,
}

/// One thing to do to a table.
pub(super) enum Step<'b> {
    /// One INSERT (per target) of consecutive CHANGES/SNAPSHOT packages of
    /// the same relation.
    Insert(Vec<&'b Decoded>),
    /// TRUNCATE the table (and its shadow).
    Truncate(&'b v1::Package),
    /// RESYNC_BEGIN: create the shadow table.
    BeginResync(&'b v1::Package),
    /// RESYNC_END: swap the shadow in.
    FinishResync(&'b v1::Package),
}

/// A break in a table's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Gap {
    pub(super) table: TableName,
    /// The position that was due (`None`: the loader knows nothing of the table).
    pub(super) expected: Option<Position>,
    pub(super) got: Position,
}

/// Plans a decoded batch. Advances `chains` as the packages are classified
/// (the caller adopts them only once the batch is applied).
pub(super) fn plan<'b>(
    decoded: impl IntoIterator<Item = &'b (usize, Result<Decoded, String>)>,
    chains: &mut Chains,
) -> Plan<'b> {
    let mut plan = Plan {
        tables: Vec::new(),
        heartbeat: None,
        dead_letters: Vec::new(),
        gaps: Vec::new(),
        seen: HashSet::new(),
    };
    for (index, decoded) in decoded {
        let index = *index;
        let decoded = match decoded {
            Ok(decoded) => decoded,
            Err(detail) => {
                plan.dead_letters.push(DeadLetter {
                    message: index,
                    reason: "decode",
                    detail: detail.clone(),
                });
                continue;
            }
        };
        let package = &decoded.package;
        if package.kind == v1::Kind::Heartbeat as i32 {
            plan.heartbeat = Some(package.commit_time_us);
            continue;
        }
        // The replicator's own record of its snapshot; nothing to apply.
        if package.kind == v1::Kind::SnapshotProgress as i32 {
            continue;
        }
        let table = TableName::new(&package.schema, &package.table);
        if !plan.seen.contains(&table) {
            plan.seen.insert(table.clone());
        }
        match chains.classify(&table, package) {
            Verdict::Apply => {
                let position = match plan.tables.iter().position(|t| t.table == table) {
                    Some(position) => position,
                    None => {
                        plan.tables.push(TablePlan {
                            table,
                            steps: Vec::new(),
                            messages: Vec::new(),
                            fills_shadow: false,
                            last_commit_lsn: 0,
                        });
                        plan.tables.len() - 1
                    }
                };
                plan.tables[position].push(index, decoded);
            }
            Verdict::AlreadyApplied | Verdict::Stale | Verdict::Blocked => {}
            Verdict::Unpositioned => plan.dead_letters.push(DeadLetter {
                message: index,
                reason: "unpositioned",
                detail: "package has no chain position".into(),
            }),
            Verdict::Gap { expected, got } => plan.gaps.push(Gap {
                table,
                expected,
                got,
            }),
        }
    }
    plan
}

impl<'b> TablePlan<'b> {
    fn push(&mut self, index: usize, decoded: &'b Decoded) {
        self.messages.push(index);
        let package = &decoded.package;
        self.last_commit_lsn = package.commit_lsn;
        let kind = v1::Kind::try_from(package.kind).unwrap_or(v1::Kind::Unspecified);
        if matches!(kind, v1::Kind::Snapshot | v1::Kind::ResyncBegin) {
            self.fills_shadow = true;
        }
        let step = match kind {
            v1::Kind::Changes | v1::Kind::Snapshot => {
                if let Some(Step::Insert(run)) = self.steps.last_mut()
                    && run
                        .first()
                        .is_some_and(|first| first.package.relation == package.relation)
                {
                    run.push(decoded);
                    return;
                }
                Step::Insert(vec![decoded])
            }
            v1::Kind::Truncate => Step::Truncate(package),
            v1::Kind::ResyncBegin => Step::BeginResync(package),
            v1::Kind::ResyncEnd => Step::FinishResync(package),
            v1::Kind::Heartbeat | v1::Kind::SnapshotProgress | v1::Kind::Unspecified => return,
        };
        self.steps.push(step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::Kind::{Changes, Heartbeat, ResyncBegin, ResyncEnd, Snapshot, Truncate};

    fn relation(columns: &[&str]) -> v1::Relation {
        v1::Relation {
            columns: columns
                .iter()
                .map(|name| v1::Column {
                    name: (*name).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn pkg(table: &str, generation: u64, sequence: u64, kind: v1::Kind) -> v1::Package {
        v1::Package {
            kind: kind as i32,
            schema: "public".into(),
            table: table.into(),
            position: Some(v1::ChainPosition {
                generation,
                sequence,
            }),
            relation: Some(relation(&["id"])),
            commit_time_us: 1_000 * sequence as i64,
            commit_lsn: 100 * sequence,
            ..Default::default()
        }
    }

    fn t(table: &str) -> TableName {
        TableName::new("public", table)
    }

    fn at(generation: u64, sequence: u64) -> Position {
        Position {
            generation,
            sequence,
        }
    }

    fn batch(packages: Vec<v1::Package>) -> Vec<(usize, Result<Decoded, String>)> {
        packages
            .into_iter()
            .enumerate()
            .map(|(i, p)| (i, Ok(Decoded::whole(p))))
            .collect()
    }

    /// The steps as `(kind, sequences)`: what an assertion can compare.
    fn steps(table: &TablePlan) -> Vec<(&'static str, Vec<u64>)> {
        let seq = |p: &v1::Package| p.position.map_or(0, |p| p.sequence);
        table
            .steps
            .iter()
            .map(|step| match step {
                Step::Insert(run) => ("insert", run.iter().map(|d| seq(&d.package)).collect()),
                Step::Truncate(p) => ("truncate", vec![seq(p)]),
                Step::BeginResync(p) => ("begin", vec![seq(p)]),
                Step::FinishResync(p) => ("finish", vec![seq(p)]),
            })
            .collect()
    }

    #[test]
    fn a_resync_from_scratch_fills_then_swaps_the_shadow() {
        let decoded = batch(vec![
            pkg("a", 1, 1, ResyncBegin),
            pkg("a", 1, 2, Snapshot),
            pkg("a", 1, 3, Snapshot),
            pkg("a", 1, 4, Changes),
            pkg("a", 1, 5, ResyncEnd),
            pkg("a", 1, 6, Changes),
        ]);
        let mut chains = Chains::default();
        let plan = plan(&decoded, &mut chains);
        assert_eq!(plan.tables.len(), 1);
        let a = &plan.tables[0];
        assert_eq!(
            steps(a),
            vec![
                ("begin", vec![1]),
                ("insert", vec![2, 3, 4]),
                ("finish", vec![5]),
                ("insert", vec![6]),
            ]
        );
        assert!(a.fills_shadow);
        assert_eq!(a.messages, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(a.last_commit_lsn, 600, "the last applied package's");
        assert!(plan.gaps.is_empty() && plan.dead_letters.is_empty());
        assert_eq!(chains.position(&t("a")), Some(at(1, 6)));
    }

    #[test]
    fn replayed_and_stale_packages_are_skipped() {
        let decoded = batch(vec![
            pkg("a", 2, 4, Changes),
            pkg("a", 2, 5, Changes),
            pkg("a", 1, 9, Changes),
            pkg("a", 2, 6, Changes),
            pkg("a", 2, 6, Changes),
        ]);
        let mut chains = Chains::restore([(t("a"), at(2, 5))]);
        let plan = plan(&decoded, &mut chains);
        assert_eq!(plan.tables.len(), 1);
        assert_eq!(steps(&plan.tables[0]), vec![("insert", vec![6])]);
        assert_eq!(plan.tables[0].messages, vec![3]);
        assert!(!plan.tables[0].fills_shadow);
        assert!(plan.gaps.is_empty() && plan.dead_letters.is_empty());
    }

    #[test]
    fn a_gap_blocks_the_table_and_asks_for_a_resync() {
        let decoded = batch(vec![
            pkg("a", 1, 6, Changes),
            pkg("a", 1, 8, Changes),
            pkg("a", 1, 9, Changes),
            pkg("b", 1, 1, Changes),
            pkg("a", 2, 1, ResyncBegin),
        ]);
        let mut chains = Chains::restore([(t("a"), at(1, 5))]);
        let plan = plan(&decoded, &mut chains);
        assert_eq!(
            plan.gaps,
            vec![Gap {
                table: t("a"),
                expected: Some(at(1, 7)),
                got: at(1, 8),
            }]
        );
        // Applied up to the gap, nothing past it, until a new chain starts.
        let tables: Vec<_> = plan.tables.iter().map(|t| t.table.clone()).collect();
        assert_eq!(tables, vec![t("a"), t("b")]);
        assert_eq!(
            steps(&plan.tables[0]),
            vec![("insert", vec![6]), ("begin", vec![1])]
        );
        assert_eq!(plan.tables[0].messages, vec![0, 4]);
        assert_eq!(steps(&plan.tables[1]), vec![("insert", vec![1])]);
        assert!(!chains.is_blocked(&t("a")), "the new chain unblocked it");
    }

    #[test]
    fn a_table_unknown_to_the_loader_mid_chain_is_a_gap() {
        let decoded = batch(vec![pkg("a", 1, 40, Changes), pkg("a", 1, 41, Changes)]);
        let mut chains = Chains::default();
        let plan = plan(&decoded, &mut chains);
        assert_eq!(
            plan.gaps,
            vec![Gap {
                table: t("a"),
                expected: None,
                got: at(1, 40),
            }]
        );
        assert!(plan.tables.is_empty());
        assert!(chains.is_blocked(&t("a")));
    }

    #[test]
    fn a_blocked_table_applies_nothing() {
        let decoded = batch(vec![pkg("a", 1, 6, Changes), pkg("a", 1, 7, Changes)]);
        let mut chains = Chains::restore_with_blocked([(t("a"), at(1, 5), true)]);
        let plan = plan(&decoded, &mut chains);
        assert!(plan.tables.is_empty());
        assert!(plan.gaps.is_empty(), "already blocked: no new gap");
        assert_eq!(plan.seen, HashSet::from([t("a")]), "seen all the same");
        assert!(chains.is_blocked(&t("a")));
    }

    #[test]
    fn truncate_and_relation_changes_split_the_inserts() {
        let mut widened = pkg("a", 1, 5, Changes);
        widened.relation = Some(relation(&["id", "note"]));
        let decoded = batch(vec![
            pkg("a", 1, 1, Changes),
            pkg("a", 1, 2, Changes),
            pkg("a", 1, 3, Truncate),
            pkg("a", 1, 4, Changes),
            widened,
            pkg("a", 1, 6, Changes),
        ]);
        let mut chains = Chains::default();
        let plan = plan(&decoded, &mut chains);
        assert_eq!(
            steps(&plan.tables[0]),
            vec![
                ("insert", vec![1, 2]),
                ("truncate", vec![3]),
                ("insert", vec![4]),
                ("insert", vec![5]),
                ("insert", vec![6]),
            ]
        );
    }

    #[test]
    fn tables_interleaved_in_the_stream_are_planned_apart() {
        let decoded = batch(vec![
            pkg("a", 1, 1, Changes),
            pkg("b", 1, 1, Changes),
            pkg("a", 1, 2, Changes),
            pkg("b", 1, 2, Changes),
        ]);
        let mut chains = Chains::default();
        let plan = plan(&decoded, &mut chains);
        let summary: Vec<_> = plan
            .tables
            .iter()
            .map(|table| {
                (
                    table.table.name.clone(),
                    steps(table),
                    table.messages.clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("a".into(), vec![("insert", vec![1, 2])], vec![0, 2]),
                ("b".into(), vec![("insert", vec![1, 2])], vec![1, 3]),
            ]
        );
    }

    #[test]
    fn undecodable_and_unpositioned_packages_are_dead_lettered_and_heartbeats_kept() {
        let mut decoded = batch(vec![
            pkg("a", 1, 1, Changes),
            v1::Package {
                kind: Heartbeat as i32,
                commit_time_us: 7,
                ..Default::default()
            },
            v1::Package {
                kind: Changes as i32,
                schema: "public".into(),
                table: "a".into(),
                ..Default::default()
            },
            v1::Package {
                kind: Heartbeat as i32,
                commit_time_us: 9,
                ..Default::default()
            },
        ]);
        decoded.insert(1, (10, Err("bad zstd frame".into())));
        let mut chains = Chains::default();
        let plan = plan(&decoded, &mut chains);
        assert_eq!(
            plan.dead_letters,
            vec![
                DeadLetter {
                    message: 10,
                    reason: "decode",
                    detail: "bad zstd frame".into(),
                },
                DeadLetter {
                    message: 2,
                    reason: "unpositioned",
                    detail: "package has no chain position".into(),
                },
            ]
        );
        assert_eq!(plan.heartbeat, Some(9), "the last heartbeat counts");
        assert_eq!(steps(&plan.tables[0]), vec![("insert", vec![1])]);
        assert_eq!(plan.tables[0].messages, vec![0]);
    }
}
