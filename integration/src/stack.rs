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
    pub nats_users: crate::NatsUsers,
    pub clickhouse_loader: Option<crate::Login>,
    pub tls: crate::TlsEnv,
}

/// The repository's `scripts/stack`.
pub fn stack_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack")
}

/// Starts Postgres, NATS (single node and 3-node cluster) and ClickHouse in a new temporary
/// directory, tied to the lifetime of this process.
pub fn start_for_this_process() -> anyhow::Result<StackEnv> {
    start_for_this_process_in().map(|(_, env)| env)
}

fn start_for_this_process_in() -> anyhow::Result<(PathBuf, StackEnv)> {
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
    let env = read_env_file(&dir.join("env"))?;
    Ok((dir, env))
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
        nats_users: crate::NatsUsers::from_lookup(|key| value(key))?,
        clickhouse_loader: crate::clickhouse_loader(|key| value(key))?,
        tls: crate::TlsEnv::from_lookup(|key| value(key)),
    })
}

/// A stack of servers owned by one test binary, which its tests may stop, restart and freeze
/// (the fault tests): unlike the shared [`crate::Servers`], nobody else uses them.
pub struct PrivateStack {
    dir: PathBuf,
    /// The endpoints, leaked so pipelines can hold them for the whole process.
    pub servers: &'static crate::Servers,
}

/// A server of a [`PrivateStack`], named as `scripts/stack` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Postgres,
    Nats,
    /// Node 1, 2 or 3 of the NATS cluster.
    ClusterNode(u8),
    ClickHouse,
}

impl Server {
    fn name(self) -> String {
        match self {
            Server::Postgres => "postgres".into(),
            Server::Nats => "nats".into(),
            Server::ClusterNode(n) => format!("nats-{n}"),
            Server::ClickHouse => "clickhouse".into(),
        }
    }
}

impl PrivateStack {
    /// Starts Postgres, NATS (single node and cluster) and ClickHouse in a new temporary
    /// directory; they die with this process.
    pub fn start() -> anyhow::Result<PrivateStack> {
        let (dir, env) = start_for_this_process_in()?;
        let servers = Box::leak(Box::new(crate::Servers {
            pg_url: env.pg_url,
            nats_url: env.nats_url,
            nats_cluster_urls: env.nats_cluster_urls,
            clickhouse_url: env.clickhouse_url,
            nats_users: env.nats_users,
            clickhouse_loader: env.clickhouse_loader,
            tls: env.tls,
        }));
        Ok(PrivateStack { dir, servers })
    }

    /// Stops one server (Postgres: fast shutdown; others: SIGTERM), keeping its data and ports.
    pub fn stop(&self, server: Server) -> anyhow::Result<()> {
        self.script(&["stop", "--only", &server.name()])
    }

    /// Starts every stopped server again, on the ports it had.
    pub fn restart_stopped(&self) -> anyhow::Result<()> {
        self.script(&["start", "--nats-cluster"])
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`, `KILL`) to a server's process.
    pub fn signal(&self, server: Server, signal: &str) -> anyhow::Result<()> {
        let pid_file = self.dir.join("run").join(format!("{}.pid", server.name()));
        let pid = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?;
        let status = Command::new("kill")
            .args(["-s", signal, pid.trim()])
            .status()
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill -s {signal} {} failed", pid.trim());
        Ok(())
    }

    fn script(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = Command::new(stack_script())
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .with_context(|| format!("running {}", stack_script().display()))?;
        if !output.status.success() {
            bail!(
                "`scripts/stack {} --dir {}` failed ({}):\n{}{}",
                args.join(" "),
                self.dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            );
        }
        Ok(())
    }
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
             SLUICE_TEST_CLICKHOUSE_TCP_PORT=6\n\
             SLUICE_TEST_NATS_PRODUCER=producer:pw:with:colons\n\
             SLUICE_TEST_NATS_TLS_URL=tls://127.0.0.1:7\n",
        )
        .unwrap();
        assert_eq!(env.nats_url, "nats://127.0.0.1:2");
        assert_eq!(env.tls.nats_url.as_deref(), Some("tls://127.0.0.1:7"));
        let producer = env.nats_users.producer.unwrap();
        assert_eq!(
            (producer.user.as_str(), producer.password.as_str()),
            ("producer", "pw:with:colons")
        );
        assert_eq!(producer.inbox_prefix(), "_INBOX_producer");
        assert_eq!(env.nats_users.admin, None);
        assert_eq!(
            env.nats_cluster_urls.unwrap(),
            ["nats://127.0.0.1:3", "nats://127.0.0.1:4"]
        );
        assert!(parse_env("SLUICE_TEST_NATS_URL=x").is_err());
    }
}
