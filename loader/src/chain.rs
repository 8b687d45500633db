//! Gap detection: where each table's chain stands and what to do with the
//! next package (ARCHITECTURE.md invariant 3).
//!
//! Each package carries `(generation, sequence)`. Within a generation the
//! sequences of a table are consecutive from 1; a new generation starts with a
//! `RESYNC_BEGIN` at sequence 1. The loader remembers the last applied position
//! per table (persisted next to the data, see `positions`) and classifies
//! every package:
//!
//! | last applied | package                         | verdict            |
//! |--------------|---------------------------------|--------------------|
//! | none         | sequence 1                      | apply              |
//! | none         | anything else                   | gap (state lost / messages lost) |
//! | (g, s)       | (g, ≤ s)                        | already applied    |
//! | (g, s)       | (g, s + 1)                      | apply              |
//! | (g, s)       | (g, > s + 1)                    | gap                |
//! | (g, s)       | (> g, 1) `RESYNC_BEGIN`         | apply (new chain)  |
//! | (g, s)       | (> g, anything else)            | gap (slot recreated, messages lost) |
//! | (g, s)       | (< g, _)                        | stale, skip        |
//!
//! After a gap the table is **blocked**: nothing more is applied to it until a
//! `RESYNC_BEGIN` of a newer generation starts a fresh chain. It never applies
//! past a gap.

use std::collections::HashMap;

use sluice_broker::TableName;
use sluice_proto::v1;

/// A chain position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub generation: u64,
    pub sequence: u64,
}

impl Position {
    pub fn of(package: &v1::Package) -> Option<Position> {
        package.position.map(|p| Position {
            generation: p.generation,
            sequence: p.sequence,
        })
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.generation, self.sequence)
    }
}

/// What to do with a package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Next in the chain: apply it.
    Apply,
    /// At or before the last applied position (a replay): skip it.
    AlreadyApplied,
    /// From an older generation than the table's chain: skip it.
    Stale,
    /// The chain is broken: `expected` was due, `got` arrived. The table is
    /// now blocked until a resync starts a new chain.
    Gap {
        expected: Option<Position>,
        got: Position,
    },
    /// The table is blocked by an earlier gap and this package does not start
    /// a new chain.
    Blocked,
    /// The package has no position at all (malformed).
    Unpositioned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    At(Position),
    Blocked(Option<Position>),
}

/// Per-table chain state.
#[derive(Debug, Default, Clone)]
pub struct Chains {
    tables: HashMap<TableName, State>,
}

impl Chains {
    /// Restores the last applied positions (from the positions table).
    pub fn restore(positions: impl IntoIterator<Item = (TableName, Position)>) -> Self {
        Chains {
            tables: positions
                .into_iter()
                .map(|(t, p)| (t, State::At(p)))
                .collect(),
        }
    }

    /// Classifies `package` of `table` and, for [`Verdict::Apply`], advances
    /// the chain. Callers must apply in the order they classify.
    pub fn classify(&mut self, table: &TableName, package: &v1::Package) -> Verdict {
        let Some(got) = Position::of(package) else {
            return Verdict::Unpositioned;
        };
        let starts_chain = got.sequence == 1 && package.kind == v1::Kind::ResyncBegin as i32;
        let state = self.tables.get(table).copied();
        let verdict = match state {
            None if got.sequence == 1 => Verdict::Apply,
            None => Verdict::Gap {
                expected: None,
                got,
            },
            Some(State::Blocked(last)) => match last {
                Some(last) if got.generation < last.generation => Verdict::Stale,
                _ if starts_chain && last.is_none_or(|l| got.generation > l.generation) => {
                    Verdict::Apply
                }
                _ => Verdict::Blocked,
            },
            Some(State::At(last)) if got.generation == last.generation => {
                if got.sequence <= last.sequence {
                    Verdict::AlreadyApplied
                } else if got.sequence == last.sequence + 1 {
                    Verdict::Apply
                } else {
                    Verdict::Gap {
                        expected: Some(Position {
                            generation: last.generation,
                            sequence: last.sequence + 1,
                        }),
                        got,
                    }
                }
            }
            Some(State::At(last)) if got.generation < last.generation => Verdict::Stale,
            Some(State::At(_)) if starts_chain => Verdict::Apply,
            Some(State::At(last)) => Verdict::Gap {
                expected: Some(Position {
                    generation: last.generation,
                    sequence: last.sequence + 1,
                }),
                got,
            },
        };
        match verdict {
            Verdict::Apply => {
                self.tables.insert(table.clone(), State::At(got));
            }
            Verdict::Gap { .. } => {
                let last = match state {
                    Some(State::At(p)) => Some(p),
                    Some(State::Blocked(p)) => p,
                    None => None,
                };
                self.tables.insert(table.clone(), State::Blocked(last));
            }
            _ => {}
        }
        verdict
    }

    /// Restores positions and which tables were blocked.
    pub fn restore_with_blocked(
        positions: impl IntoIterator<Item = (TableName, Position, bool)>,
    ) -> Self {
        Chains {
            tables: positions
                .into_iter()
                .map(|(t, p, blocked)| {
                    (
                        t,
                        if blocked {
                            State::Blocked(Some(p))
                        } else {
                            State::At(p)
                        },
                    )
                })
                .collect(),
        }
    }

    /// Sets one table's position and whether it is blocked, as read from the
    /// positions table.
    pub fn restore_table(&mut self, table: &TableName, position: Position, blocked: bool) {
        let state = if blocked {
            State::Blocked(Some(position))
        } else {
            State::At(position)
        };
        self.tables.insert(table.clone(), state);
    }

    /// Forgets a table (it has no position).
    pub fn forget(&mut self, table: &TableName) {
        self.tables.remove(table);
    }

    /// Last applied position of a table.
    pub fn position(&self, table: &TableName) -> Option<Position> {
        match self.tables.get(table)? {
            State::At(p) => Some(*p),
            State::Blocked(p) => *p,
        }
    }

    /// Whether a table waits for a resync.
    pub fn is_blocked(&self, table: &TableName) -> bool {
        matches!(self.tables.get(table), Some(State::Blocked(_)))
    }

    /// Tables waiting for a resync.
    pub fn blocked(&self) -> Vec<TableName> {
        let mut tables: Vec<_> = self
            .tables
            .iter()
            .filter(|(_, s)| matches!(s, State::Blocked(_)))
            .map(|(t, _)| t.clone())
            .collect();
        tables.sort();
        tables
    }

    /// Blocks a table until a resync starts a new chain (e.g. after rows that
    /// cannot be written).
    pub fn block(&mut self, table: &TableName) {
        let last = self.position(table);
        self.tables.insert(table.clone(), State::Blocked(last));
    }

    /// Forgets a table's progress back to `position` (used when a batch could
    /// not be written and will be redelivered).
    pub fn rewind(&mut self, table: &TableName, position: Option<Position>) {
        match position {
            Some(p) => self.tables.insert(table.clone(), State::At(p)),
            None => self.tables.remove(table),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(generation: u64, sequence: u64, kind: v1::Kind) -> v1::Package {
        v1::Package {
            kind: kind as i32,
            position: Some(v1::ChainPosition {
                generation,
                sequence,
            }),
            ..Default::default()
        }
    }

    fn t() -> TableName {
        TableName::new("public", "t")
    }

    use v1::Kind::{Changes, ResyncBegin};

    #[test]
    fn consecutive_packages_apply_and_replays_skip() {
        let mut chains = Chains::default();
        assert_eq!(
            chains.classify(&t(), &pkg(1, 1, ResyncBegin)),
            Verdict::Apply
        );
        assert_eq!(chains.classify(&t(), &pkg(1, 2, Changes)), Verdict::Apply);
        assert_eq!(
            chains.classify(&t(), &pkg(1, 2, Changes)),
            Verdict::AlreadyApplied
        );
        assert_eq!(
            chains.classify(&t(), &pkg(1, 1, ResyncBegin)),
            Verdict::AlreadyApplied
        );
        assert_eq!(chains.classify(&t(), &pkg(1, 3, Changes)), Verdict::Apply);
        assert_eq!(
            chains.position(&t()),
            Some(Position {
                generation: 1,
                sequence: 3
            })
        );
    }

    #[test]
    fn skipped_sequence_is_a_gap_and_blocks_until_a_new_chain() {
        let mut chains = Chains::restore([(
            t(),
            Position {
                generation: 1,
                sequence: 5,
            },
        )]);
        let verdict = chains.classify(&t(), &pkg(1, 7, Changes));
        assert_eq!(
            verdict,
            Verdict::Gap {
                expected: Some(Position {
                    generation: 1,
                    sequence: 6
                }),
                got: Position {
                    generation: 1,
                    sequence: 7
                }
            }
        );
        assert!(chains.is_blocked(&t()));
        assert_eq!(
            chains.classify(&t(), &pkg(1, 8, Changes)),
            Verdict::Blocked,
            "never applies past a gap"
        );
        assert_eq!(chains.classify(&t(), &pkg(1, 6, Changes)), Verdict::Blocked);
        assert_eq!(
            chains.classify(&t(), &pkg(2, 1, ResyncBegin)),
            Verdict::Apply
        );
        assert!(!chains.is_blocked(&t()));
        assert_eq!(chains.classify(&t(), &pkg(2, 2, Changes)), Verdict::Apply);
    }

    #[test]
    fn new_generation_without_resync_begin_is_a_gap() {
        let mut chains = Chains::restore([(
            t(),
            Position {
                generation: 1,
                sequence: 5,
            },
        )]);
        assert!(matches!(
            chains.classify(&t(), &pkg(2, 1, Changes)),
            Verdict::Gap { .. }
        ));
    }

    #[test]
    fn missing_loader_state_mid_chain_is_a_gap() {
        let mut chains = Chains::default();
        assert!(matches!(
            chains.classify(&t(), &pkg(1, 40, Changes)),
            Verdict::Gap { expected: None, .. }
        ));
        assert_eq!(
            chains.classify(&t(), &pkg(1, 1, ResyncBegin)),
            Verdict::Apply,
            "fresh chain unblocks"
        );
    }

    #[test]
    fn older_generation_is_stale() {
        let mut chains = Chains::restore([(
            t(),
            Position {
                generation: 3,
                sequence: 1,
            },
        )]);
        assert_eq!(chains.classify(&t(), &pkg(2, 9, Changes)), Verdict::Stale);
        assert_eq!(
            chains.classify(&t(), &v1::Package::default()),
            Verdict::Unpositioned
        );
    }

    #[test]
    fn rewind_restores_a_position() {
        let mut chains = Chains::default();
        chains.classify(&t(), &pkg(1, 1, ResyncBegin));
        chains.classify(&t(), &pkg(1, 2, Changes));
        chains.rewind(
            &t(),
            Some(Position {
                generation: 1,
                sequence: 1,
            }),
        );
        assert_eq!(chains.classify(&t(), &pkg(1, 2, Changes)), Verdict::Apply);
        chains.rewind(&t(), None);
        assert_eq!(chains.position(&t()), None);
    }
}
