//! Starting the local server stack (`scripts/stack`) for one test process.
//!
//! The servers must not outlive the test process, and `unsafe` (hence `prctl(PDEATHSIG)`) is
//! forbidden in the workspace, so `scripts/stack start --watch-pid <our pid> --remove-dir` leaves
//! a small guardian shell loop behind that runs `scripts/stack stop` and deletes the directory
//! once this process is gone, however it ends.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// Endpoints written by `scripts/stack start` to `DIR/env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackEnv {
    pub pg_url: String,
    pub nats_url: String,
    pub nats_cluster_urls: Option<Vec<String>>,
    pub clickhouse_url: String,
}

/// The repository's `scripts/stack`.
pub fn stack_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack")
}

/// Starts Postgres, NATS (single node and 3-node cluster) and ClickHouse in a new temporary
/// directory, tied to the lifetime of this process.
pub fn start_for_this_process() -> anyhow::Result<StackEnv> {
    let dir = tempfile::Builder::new()
        .prefix("sluice-test-stack-")
        .tempdir()
        .context("creating a temporary directory for the server stack")?
        // The guardian deletes it; a TempDir would delete it under running servers.
        .keep();
    let output = Command::new(stack_script())
        .arg("start")
        .arg("--dir")
        .arg(&dir)
        .args(["--nats-cluster", "--remove-dir", "--watch-pid"])
        .arg(std::process::id().to_string())
        .output()
        .with_context(|| format!("running {}", stack_script().display()))?;
    if !output.status.success() {
        bail!(
            "`scripts/stack start --dir {}` failed ({}):\n{}{}",
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
    read_env_file(&dir.join("env"))
}

/// Reads a `DIR/env` file written by `scripts/stack start`.
pub fn read_env_file(path: &Path) -> anyhow::Result<StackEnv> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_env(&text).with_context(|| format!("in {}", path.display()))
}

fn parse_env(text: &str) -> anyhow::Result<StackEnv> {
    let value = |key: &str| {
        text.lines()
            .filter_map(|line| line.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
    };
    let required = |key: &str| value(key).with_context(|| format!("{key} missing"));
    Ok(StackEnv {
        pg_url: required("SLUICE_TEST_PG_URL")?,
        nats_url: required("SLUICE_TEST_NATS_URL")?,
        nats_cluster_urls: value("SLUICE_TEST_NATS_CLUSTER_URLS").map(|v| super::split_urls(&v)),
        clickhouse_url: required("SLUICE_TEST_CLICKHOUSE_URL")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_env_file() {
        let env = parse_env(
            "SLUICE_TEST_PG_URL=postgres://postgres@127.0.0.1:1/postgres\n\
             SLUICE_TEST_NATS_URL=nats://127.0.0.1:2\n\
             SLUICE_TEST_NATS_CLUSTER_URLS=nats://127.0.0.1:3,nats://127.0.0.1:4\n\
             SLUICE_TEST_CLICKHOUSE_URL=http://127.0.0.1:5\n\
             SLUICE_TEST_CLICKHOUSE_TCP_PORT=6\n",
        )
        .unwrap();
        assert_eq!(env.nats_url, "nats://127.0.0.1:2");
        assert_eq!(
            env.nats_cluster_urls.unwrap(),
            ["nats://127.0.0.1:3", "nats://127.0.0.1:4"]
        );
        assert!(parse_env("SLUICE_TEST_NATS_URL=x").is_err());
    }
}
