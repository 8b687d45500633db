//! Unique object names, so tests can share servers (and run in parallel) without colliding.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// `prefix` plus this process's id, a per-process counter and a time component: unique across
/// the tests of one run and, with overwhelming likelihood, across runs against the same servers.
/// Only `[a-z0-9_]`, at most 63 bytes, so it is a valid Postgres, ClickHouse and JetStream name
/// without quoting.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let mut prefix: String = prefix
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect();
    prefix.truncate(32);
    format!("{prefix}_{}_{n}_{nanos:08x}", std::process::id())
}

/// A unique JetStream stream name.
pub fn fresh_stream_name(prefix: &str) -> String {
    unique_name(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_plain() {
        let a = unique_name("Loader-Test.x");
        let b = unique_name("Loader-Test.x");
        assert_ne!(a, b);
        assert!(a.starts_with("loader_test_x_"));
        assert!(a.len() <= 63);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        );
    }
}
