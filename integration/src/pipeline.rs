//! A whole sluice pipeline for one test: a fresh Postgres database, a config
//! file with unique names (source, slot, stream, ClickHouse database, ports),
//! and the real `sluice-replicator` / `sluice-loader` binaries as child
//! processes that the test can start, kill -9, stop gracefully and restart.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let mut p = sluice_integration::pipeline::Pipeline::start("orders").await?;
//! p.pg().await?.batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION sluice FOR TABLE t").await?;
//! p.spawn_replicator()?;
//! p.spawn_loader()?;
//! p.wait_until_equal(std::time::Duration::from_secs(60)).await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use async_nats::jetstream;
use sluice_broker::config::Config;
use sluice_loader::verify::{self, TableReport};

use crate::{Servers, unique_name};

/// Which NATS the pipeline's stream lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nats {
    /// The single node, stream R1.
    Single,
    /// The 3-node cluster, stream R3.
    Cluster,
}

/// One test's pipeline. Dropping it kills the child processes.
pub struct Pipeline {
    /// Source name; also the slot, the consumer's stream suffix and the ClickHouse database.
    pub name: String,
    /// URL of the test's own Postgres database.
    pub pg_url: String,
    pub config_path: PathBuf,
    pub config: Config,
    /// Holds the config and the logs (`replicator.N.log`, `loader.N.log`).
    pub dir: PathBuf,
    /// Deletes `dir` on drop unless the test panicked or `SLUICE_TEST_KEEP` is set.
    temp: Option<tempfile::TempDir>,
    servers: &'static Servers,
    nats_urls: String,
    replicator: Option<Child>,
    loader: Option<Child>,
    runs: BTreeMap<&'static str, u32>,
    /// `FAILPOINTS` of the next programs started (`None`: unset).
    failpoints: Option<String>,
    /// Environment of the next program started, on top of the usual.
    extra_env: Vec<(&'static str, String)>,
    /// The Postgres URL `verify` compares with, when not the binaries' own
    /// (a replicator reading a standby is checked against the primary).
    verify_url: Option<String>,
}

/// Paths of the two binaries, built once per test process.
pub struct Binaries {
    pub replicator: PathBuf,
    pub loader: PathBuf,
}

/// Builds `sluice-replicator` and `sluice-loader` with the profile and target
/// directory of the running test executable (`<target>/<profile>/deps/<test>`).
///
/// Some dependencies (ring, rustls, async-nats) get other features in a
/// `cargo test` build than in this one, so the first build after a `cargo
/// test` compiles those again (about a minute). A target directory of its own
/// would avoid that locally but costs a full extra build in CI, so only the
/// benches (any profile but `dev`, never built by CI) get one:
/// `<target>/sluice-bins`. Sharing `<target>/release` made every `cargo
/// bench` and the build here undo each other's artifacts, minutes per run.
pub fn binaries() -> anyhow::Result<&'static Binaries> {
    static BINARIES: OnceLock<Result<Binaries, String>> = OnceLock::new();
    BINARIES
        .get_or_init(|| build_binaries().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("building the sluice binaries: {e}"))
}

fn build_binaries() -> anyhow::Result<Binaries> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable is not in <target>/<profile>/deps")?
        .to_owned();
    let target_dir = profile_dir
        .parent()
        .context("test executable is not in <target>/<profile>/deps")?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let (target_dir, profile_dir) = if profile == "dev" {
        (target_dir.to_owned(), profile_dir)
    } else {
        let own = target_dir.join("sluice-bins");
        let profile_dir = own.join(&profile);
        (own, profile_dir)
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(&cargo)
        .current_dir(&workspace)
        .env("CARGO_TARGET_DIR", &target_dir)
        .args([
            "build",
            "--bins",
            "-p",
            "sluice-replicator",
            "-p",
            "sluice-loader",
        ])
        .args(["--profile", &profile])
        // Failpoints for the crash tests (inert unless FAILPOINTS is set); not in the benches'
        // builds, which measure what ships.
        .args(if profile == "dev" {
            &[
                "--features",
                "sluice-loader/failpoints,sluice-replicator/failpoints",
            ][..]
        } else {
            &[]
        })
        .status()
        .with_context(|| format!("running {cargo} build"))?;
    if !status.success() {
        bail!("`cargo build --bins -p sluice-replicator -p sluice-loader` failed: {status}");
    }
    let binaries = Binaries {
        replicator: profile_dir.join("sluice-replicator"),
        loader: profile_dir.join("sluice-loader"),
    };
    for path in [&binaries.replicator, &binaries.loader] {
        if !path.exists() {
            bail!("{} missing after the build", path.display());
        }
    }
    Ok(binaries)
}

/// A loopback port that was free when asked, for a server a test starts
/// (possibly several times: a restarted replicator gets its port back).
///
/// Taken below Linux's ephemeral range (32768-60999 by default), never from
/// `bind(0)`: a port in that range can be handed to any outgoing connection
/// between a kill and the next start (a restarted loader once failed with
/// "Address already in use" that way). Ports here are handed out by a
/// process-wide counter from a per-process random start, so two pipelines of
/// one test process never get the same one.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let start = Rng::new(nanos ^ u64::from(std::process::id()) << 32).below(u64::from(COUNT));
    let _ = NEXT.compare_exchange(u32::MAX, start as u32, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..COUNT {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port in {FIRST}..{}", FIRST + COUNT)
}

impl Pipeline {
    /// A pipeline on the single NATS node.
    pub async fn start(name: &str) -> anyhow::Result<Pipeline> {
        Self::start_on(name, Nats::Single)
            .await
            .map(|p| p.expect("single node always exists"))
    }

    /// A pipeline on `nats`; `None` when the cluster is asked for and there is none.
    pub async fn start_on(name: &str, nats: Nats) -> anyhow::Result<Option<Pipeline>> {
        Self::start_with(name, nats, Servers::get()).await
    }

    /// A pipeline on `servers` (e.g. a [`crate::stack::PrivateStack`]'s, which the test may
    /// stop and restart); `None` when the cluster is asked for and there is none.
    pub async fn start_with(
        name: &str,
        nats: Nats,
        servers: &'static Servers,
    ) -> anyhow::Result<Option<Pipeline>> {
        let (nats_urls, replicas) = match nats {
            Nats::Single => (servers.nats_url.clone(), 1),
            Nats::Cluster => match &servers.nats_cluster_urls {
                Some(urls) => (urls.join(","), 3),
                None => return Ok(None),
            },
        };
        // Built now, so that no caller's clock (a benchmark's) includes the
        // build of the first spawn.
        binaries()?;
        // `sluice_`: the loader's least-privilege ClickHouse user may touch only the databases
        // so named (scripts/clickhouse-server.py), and the database is the source name.
        let name = unique_name(&format!("sluice_{name}"));
        let (pg_url, _) = servers.fresh_pg_database(&name).await?;
        let dir = tempfile::Builder::new()
            .prefix("sluice-pipeline-")
            .tempdir()
            .context("creating the pipeline's directory")?;
        let config_path = dir.path().join("sluice.toml");
        let toml = format!(
            r#"source = "{name}"

[postgres]
url = "{pg_url}"
publication = "sluice"
slot = "{name}"

[nats]
url = "{nats_urls}"
replicas = {replicas}
duplicate_window = "10m"
max_age = "1h"

[clickhouse]
url = "{ch}"
database = "{name}"
{ch_login}

[replicator]
metrics_listen = "127.0.0.1:{rport}"
package_max_rows = 500
status_interval = "500ms"
heartbeat_interval = "1s"

[loader]
metrics_listen = "127.0.0.1:{lport}"
batch_max_messages = 200
batch_max_wait = "200ms"
ack_wait = "30s"
"#,
            ch = servers.clickhouse_url,
            ch_login = servers
                .clickhouse_loader
                .as_ref()
                .map_or(String::new(), |login| {
                    format!(
                        "user = \"{}\"\npassword = \"{}\"",
                        login.user, login.password
                    )
                }),
            rport = free_port()?,
            lport = free_port()?,
        );
        std::fs::write(&config_path, toml)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let config = Config::load(&config_path)?;
        Ok(Some(Pipeline {
            name,
            pg_url,
            config_path,
            config,
            dir: dir.path().to_owned(),
            temp: Some(dir),
            servers,
            nats_urls,
            replicator: None,
            loader: None,
            runs: BTreeMap::new(),
            failpoints: None,
            extra_env: Vec::new(),
            verify_url: None,
        }))
    }

    /// Sets `key = value` (TOML, e.g. `"1000"` or `"\"5s\""`) in `[section]`
    /// of the config (replacing the key's earlier value), for the binaries
    /// started after this call.
    pub fn set_config(&mut self, section: &str, key: &str, value: &str) -> anyhow::Result<()> {
        self.set_configs(section, &[(key, value)])
    }

    /// [`Self::set_config`] for several keys at once, for keys that are valid
    /// only together (e.g. `ssl_cert` and `ssl_key`).
    pub fn set_configs(&mut self, section: &str, pairs: &[(&str, &str)]) -> anyhow::Result<()> {
        let pairs: Vec<(&str, Option<&str>)> = pairs.iter().map(|(k, v)| (*k, Some(*v))).collect();
        self.edit_config(section, &pairs)
    }

    /// Lets the product's defaults size packages and batches instead of the
    /// harness' small ones (which keep tests quick and their batches many):
    /// for benches whose figures a user with the default config should see.
    pub fn use_default_batching(&mut self) -> anyhow::Result<()> {
        self.unset_config("replicator", "package_max_rows")?;
        self.unset_config("loader", "batch_max_messages")?;
        self.unset_config("loader", "batch_max_wait")
    }

    /// Removes `key` from `[section]`, so that its default applies.
    pub fn unset_config(&mut self, section: &str, key: &str) -> anyhow::Result<()> {
        self.edit_config(section, &[(key, None)])
    }

    /// Sets (`Some`) or removes (`None`) keys of `[section]`, then reloads.
    fn edit_config(&mut self, section: &str, pairs: &[(&str, Option<&str>)]) -> anyhow::Result<()> {
        let mut text = std::fs::read_to_string(&self.config_path)?;
        for (key, value) in pairs {
            let header = format!("[{section}]\n");
            let at = text
                .find(&header)
                .with_context(|| format!("no [{section}] in the config"))?
                + header.len();
            let end = text[at..].find("\n[").map_or(text.len(), |i| at + i + 1);
            let assignment = format!("{key} =");
            let kept: String = text[at..end]
                .lines()
                .filter(|line| !line.trim_start().starts_with(&assignment))
                .map(|line| format!("{line}\n"))
                .collect();
            let assignment = value.map_or(String::new(), |value| format!("{key} = {value}\n"));
            text = format!("{}{assignment}{kept}{}", &text[..at], &text[end..]);
        }
        std::fs::write(&self.config_path, text)?;
        self.config = Config::load(&self.config_path)?;
        Ok(())
    }

    /// Applies `SLUICE_BENCH_CONFIG`, `section.key=value` pairs separated by
    /// `;` (e.g. `replicator.catchup_min_lag_bytes=0`), with [`Self::set_config`];
    /// prints each for the benchmark's output.
    pub fn set_config_from_env(&mut self) -> anyhow::Result<()> {
        let Ok(pairs) = std::env::var("SLUICE_BENCH_CONFIG") else {
            return Ok(());
        };
        for pair in pairs.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (path, value) = pair.split_once('=').with_context(|| {
                format!("SLUICE_BENCH_CONFIG: {pair:?} is not section.key=value")
            })?;
            let (section, key) = path
                .split_once('.')
                .with_context(|| format!("SLUICE_BENCH_CONFIG: {path:?} is not section.key"))?;
            self.set_config(section, key, value)?;
            println!("config: {pair} (SLUICE_BENCH_CONFIG)");
        }
        Ok(())
    }

    /// Creates one [`workload_table_sql`] table per name and the publication
    /// `sluice` of exactly those tables.
    pub async fn publish_workload_tables(&self, tables: &[&str]) -> anyhow::Result<()> {
        let mut sql: Vec<String> = tables.iter().map(|t| workload_table_sql(t)).collect();
        sql.push(format!(
            "CREATE PUBLICATION sluice FOR TABLE {}",
            tables.join(", ")
        ));
        self.pg().await?.batch_execute(&sql.join(";")).await?;
        Ok(())
    }

    /// The servers this pipeline runs on.
    pub fn servers(&self) -> &'static Servers {
        self.servers
    }

    /// A new connection to the pipeline's Postgres database.
    pub async fn pg(&self) -> anyhow::Result<tokio_postgres::Client> {
        Servers::pg_connect(&self.pg_url).await
    }

    /// The JetStream context of the pipeline's NATS (single node or cluster).
    pub async fn jetstream(&self) -> anyhow::Result<jetstream::Context> {
        let urls: Vec<&str> = self.nats_urls.split(',').collect();
        Ok(jetstream::new(self.servers.nats_connect(&urls).await?))
    }

    /// Starts `sluice-replicator` (`which == "replicator"`) or `sluice-loader`
    /// with `args` and this pipeline's config; output goes to
    /// `<log>.N.log` in the pipeline's directory.
    fn spawn_logged(
        &mut self,
        which: &'static str,
        log: &'static str,
        args: &[&str],
    ) -> anyhow::Result<Child> {
        let run = self.runs.entry(log).or_default();
        *run += 1;
        let log_path = self.dir.join(format!("{log}.{run}.log"));
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = self.command(which)?;
        command
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env(
                "RUST_LOG",
                std::env::var("SLUICE_TEST_CHILD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        match &self.failpoints {
            Some(spec) => command.env("FAILPOINTS", spec),
            None => command.env_remove("FAILPOINTS"),
        };
        command.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        command
            .spawn()
            .with_context(|| format!("starting sluice-{which}"))
    }

    /// Sets (or with `None` clears) the failpoints of the programs started from now on, in the
    /// `fail` crate's `FAILPOINTS` syntax (`name=return;other=3*off->return`). Where state is
    /// written, `return` exits the program at once (code 86), like a kill: the loader's
    /// `loader::insert::after`, `loader::positions::after_save`, `loader::ack::after`,
    /// `loader::resync::after_create`, `loader::resync::after_exchange`,
    /// `loader::resync::after_drop`; the replicator's `replicator::publish::after_package`,
    /// `replicator::confirm::after_status`, `replicator::backlog::after_advance`,
    /// `replicator::resync::after_begin` and `broker::publish::between_chunks` (each once what
    /// was published is acknowledged). `replicator::snapshot::package=return(MS)` sleeps MS
    /// milliseconds after each snapshot package, `replicator::streamed::replay=return(MS)` before
    /// each round of a committed streamed transaction's replay, `replicator::resync::before_plan=
    /// return(MS)` after a resync's slot is created, before its table is planned.
    pub fn set_failpoints(&mut self, spec: Option<&str>) {
        self.failpoints = spec.map(str::to_owned);
    }

    /// `sluice-replicator` (`which == "replicator"`) or `sluice-loader` as its
    /// least-privilege NATS user, so a permission the program needs and
    /// `broker/nats/accounts.conf` lacks fails a test.
    fn command(&self, which: &str) -> anyhow::Result<Command> {
        let binaries = binaries()?;
        let users = &self.servers.nats_users;
        let (bin, nats_user) = if which == "replicator" {
            (&binaries.replicator, &users.producer)
        } else {
            (&binaries.loader, &users.consumer)
        };
        let mut command = Command::new(bin);
        if let Some(user) = nats_user {
            command
                .env("SLUICE_NATS__USER", &user.user)
                .env("SLUICE_NATS__PASSWORD", &user.password)
                .env("SLUICE_NATS__INBOX_PREFIX", user.inbox_prefix());
        }
        Ok(command)
    }

    /// Runs a one-shot command (`status`, `verify`, ...) of `sluice-replicator`
    /// (`which == "replicator"`) or `sluice-loader` to its end with this
    /// pipeline's config and without `RUST_LOG` (the command's own default
    /// log level); returns stdout and stderr, failing on a non-zero exit.
    pub fn cli(&self, which: &str, args: &[&str]) -> anyhow::Result<(String, String)> {
        self.cli_with(self.command(which)?, which, args)
    }

    /// [`Pipeline::cli`] as the harness's NATS admin user (an operator's), not the program's
    /// least-privilege one.
    pub fn cli_as_admin(&self, which: &str, args: &[&str]) -> anyhow::Result<(String, String)> {
        let mut command = self.command(which)?;
        if let Some(admin) = &self.servers.nats_users.admin {
            command
                .env("SLUICE_NATS__USER", &admin.user)
                .env("SLUICE_NATS__PASSWORD", &admin.password)
                .env_remove("SLUICE_NATS__INBOX_PREFIX");
        }
        self.cli_with(command, which, args)
    }

    fn cli_with(
        &self,
        mut command: Command,
        which: &str,
        args: &[&str],
    ) -> anyhow::Result<(String, String)> {
        let output = command
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("RUST_LOG")
            .output()
            .with_context(|| format!("running sluice-{which}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        anyhow::ensure!(
            output.status.success(),
            "sluice-{which} {args:?} exited {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            output.status.code()
        );
        Ok((stdout, stderr))
    }

    /// Scrapes `which` (`"replicator"` or `"loader"`) until every series of
    /// `expected` (name and labels, e.g. `sluice_gaps_detected_total{table="public.t"}`)
    /// is exported, then checks each is exactly 0. `when` names the moment in
    /// the failure message.
    pub async fn assert_metrics_at_zero(
        &self,
        which: &str,
        expected: &[&str],
        when: &str,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = if which == "replicator" {
                self.replicator_metrics().await
            } else {
                self.loader_metrics().await
            }
            .unwrap_or_default();
            let missing: Vec<&&str> = expected
                .iter()
                .filter(|series| !has_sample(&text, series))
                .collect();
            if missing.is_empty() {
                for series in expected {
                    anyhow::ensure!(
                        metric(&text, &format!("{series} ")) == Some(0.0),
                        "{when}: {series} is not 0\n{text}"
                    );
                }
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{when}: sluice-{which} never exported {missing:?}\n{text}\n--- log tail:\n{}",
                self.log_tail(which, 30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn spawn(&mut self, which: &'static str) -> anyhow::Result<Child> {
        self.spawn_logged(which, which, &["run"])
    }

    /// Runs another `sluice-replicator` command (e.g. `resync`) against this
    /// pipeline's config; output goes to `replicator-cli.N.log`.
    pub fn replicator_command(&mut self, args: &[&str]) -> anyhow::Result<Child> {
        self.spawn_logged("replicator", "replicator-cli", args)
    }

    /// A second `sluice-replicator run` of this pipeline (a standby), on its own metrics
    /// port; output goes to `replicator-cli.N.log`.
    pub fn spawn_second_replicator(&mut self) -> anyhow::Result<Child> {
        let listen = format!("127.0.0.1:{}", free_port()?);
        self.extra_env = vec![("SLUICE_REPLICATOR__METRICS_LISTEN", listen)];
        let child = self.spawn_logged("replicator", "replicator-cli", &["run"]);
        self.extra_env.clear();
        child
    }

    /// Fills the stream for a loader benchmark: publishes `tables` (workload
    /// tables), inserts `rows` bench rows into each ([`insert_bench_rows`], in
    /// transactions of `per_transaction`) with the replicator alone, waits until
    /// its slot confirmed them (every package acknowledged by JetStream) and
    /// stops it. Returns the stream's message count and bytes.
    pub async fn fill_stream_alone(
        &mut self,
        tables: &[&str],
        rows: u64,
        per_transaction: u64,
    ) -> anyhow::Result<(u64, u64)> {
        let pg = self.pg().await?;
        self.publish_workload_tables(tables).await?;
        self.spawn_replicator()?;
        self.wait_for_heartbeat(Duration::from_secs(120)).await?;
        for table in tables {
            insert_bench_rows(&pg, table, rows, per_transaction).await?;
        }
        let end_lsn = crate::wal_insert_lsn(&pg).await?;
        self.wait_slot_confirmed(&end_lsn, Duration::from_secs(3600))
            .await?;
        self.stop_replicator().await?;
        let js = self.jetstream().await?;
        let mut stream = js.get_stream(self.config.stream_name()).await?;
        let info = stream.info().await?;
        Ok((info.state.messages, info.state.bytes))
    }

    /// Starts one more `sluice-loader run` of this pipeline's source with its own
    /// `loader.consumer` (`name`) and metrics port (returned); output goes to
    /// `loader-<name>.N.log` ([`Pipeline::log_lines_containing`] with `loader-<name>`).
    /// The caller owns the process (kill it by its handle).
    pub fn spawn_named_loader(&mut self, name: &str) -> anyhow::Result<(Child, u16)> {
        let port = free_port()?;
        self.extra_env = vec![
            ("SLUICE_LOADER__CONSUMER", name.to_owned()),
            ("SLUICE_LOADER__METRICS_LISTEN", format!("127.0.0.1:{port}")),
        ];
        // The log's name lives as long as the runs' table that counts it.
        let log: &'static str = Box::leak(format!("loader-{name}").into_boxed_str());
        let child = self.spawn_logged("loader", log, &["run"]);
        self.extra_env.clear();
        Ok((child?, port))
    }

    /// Runs another `sluice-loader` command (e.g. `run` watched by the test
    /// itself) against this pipeline's config; output goes to
    /// `loader-cli.N.log`.
    pub fn loader_command(&mut self, args: &[&str]) -> anyhow::Result<Child> {
        self.spawn_logged("loader", "loader-cli", args)
    }

    /// Starts `sluice-replicator run` (which must not be running).
    pub fn spawn_replicator(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.replicator.is_none(), "replicator already running");
        self.replicator = Some(self.spawn("replicator")?);
        Ok(())
    }

    /// Starts `sluice-loader run` (which must not be running).
    pub fn spawn_loader(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.loader.is_none(), "loader already running");
        self.loader = Some(self.spawn("loader")?);
        Ok(())
    }

    /// The running replicator's process id.
    pub fn replicator_pid(&self) -> Option<u32> {
        self.replicator.as_ref().map(Child::id)
    }

    /// The running loader's process id.
    pub fn loader_pid(&self) -> Option<u32> {
        self.loader.as_ref().map(Child::id)
    }

    /// SIGKILLs the replicator and reaps it.
    pub fn kill_9_replicator(&mut self) -> anyhow::Result<()> {
        kill_9(self.replicator.take())
    }

    /// SIGKILLs the loader and reaps it.
    pub fn kill_9_loader(&mut self) -> anyhow::Result<()> {
        kill_9(self.loader.take())
    }

    /// SIGTERMs the replicator and waits (at most 30 s, then SIGKILL); fails if
    /// it did not exit successfully.
    pub async fn stop_replicator(&mut self) -> anyhow::Result<()> {
        stop_child(self.replicator.take(), "replicator").await
    }

    /// SIGTERMs the loader and waits (at most 30 s, then SIGKILL).
    pub async fn stop_loader(&mut self) -> anyhow::Result<()> {
        stop_child(self.loader.take(), "loader").await
    }

    /// Waits for the loader to exit on its own (a failpoint, a fatal error) and returns its exit
    /// status; fails with its log tail if it still runs after `timeout`.
    pub async fn wait_loader_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.wait_exit("loader", timeout).await
    }

    /// [`Pipeline::wait_loader_exit`] for `which` (`"replicator"` or `"loader"`).
    pub async fn wait_exit(
        &mut self,
        which: &str,
        timeout: Duration,
    ) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let slot = if which == "replicator" {
                &mut self.replicator
            } else {
                &mut self.loader
            };
            let child = slot
                .as_mut()
                .with_context(|| format!("{which} not running"))?;
            if let Some(status) = child.try_wait()? {
                *slot = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "the {which} still runs after {timeout:?}:\n{}",
                    self.log_tail(which, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails if a started child has exited on its own (with its log tail).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        let mut exited = None;
        for (which, child) in [
            ("replicator", &mut self.replicator),
            ("loader", &mut self.loader),
        ] {
            if let Some(c) = child
                && let Some(status) = c.try_wait()?
            {
                exited = Some((which, status));
                break;
            }
        }
        if let Some((which, status)) = exited {
            bail!(
                "{which} exited unexpectedly ({status}); log:\n{}",
                self.log_tail(which, 40)
            );
        }
        Ok(())
    }

    /// The last `lines` lines of the newest log of `which` (`replicator`/`loader`).
    pub fn log_tail(&self, which: &str, lines: usize) -> String {
        let run = self.runs.get(which).copied().unwrap_or(0);
        let path = self.dir.join(format!("{which}.{run}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until `table` holds exactly `rows` rows in its `FINAL` view, while
    /// both binaries stay alive. Polls the plain `count()` (the parts' row
    /// counts, nothing merged) every `poll` until it reaches `rows` and only
    /// then `count() FINAL`, so that the waiting adds no query load competing
    /// with what a benchmark measures. A table that does not exist yet counts 0.
    pub async fn wait_for_final_rows(
        &mut self,
        table: &str,
        rows: u64,
        poll: Duration,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        self.wait_for_count(table, poll, deadline, |n| n >= rows)
            .await?;
        self.wait_for_count(&format!("{table} FINAL"), poll, deadline, |n| n == rows)
            .await
            .with_context(|| format!("{table} did not reach {rows} rows within {timeout:?}"))
    }

    /// Polls `SELECT count() FROM {from}` every `poll` until `done` says so.
    async fn wait_for_count(
        &mut self,
        from: &str,
        poll: Duration,
        deadline: Instant,
        done: impl Fn(u64) -> bool,
    ) -> anyhow::Result<()> {
        let ch = self.servers.clickhouse();
        loop {
            self.check_alive()?;
            let count = crate::clickhouse_count(&ch, from).await.unwrap_or(0);
            if done(count) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "SELECT count() FROM {from} still {count} at the deadline"
            );
            tokio::time::sleep(poll).await;
        }
    }

    /// Lines of every log of `which` (all its runs so far) that contain `needle`.
    pub fn log_lines_containing(&self, which: &str, needle: &str) -> Vec<String> {
        let runs = self.runs.get(which).copied().unwrap_or(0);
        (1..=runs)
            .flat_map(|run| {
                let path = self.dir.join(format!("{which}.{run}.log"));
                std::fs::read_to_string(path)
                    .unwrap_or_default()
                    .lines()
                    .filter(|line| line.contains(needle))
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Waits until the logs of `which` (all its runs) hold at least `count`
    /// lines containing `needle`, and returns them; fails with the log's
    /// tail at `timeout`, or when a process exited.
    pub async fn wait_for_log_lines(
        &mut self,
        which: &str,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.log_lines_containing(which, needle);
            if lines.len() >= count {
                return Ok(lines);
            }
            self.check_alive()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "{which} logged {} of {count} lines with {needle:?} within {timeout:?}:\n{}",
                lines.len(),
                self.log_tail(which, 30)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The tails of the newest replicator and loader logs (those that ran),
    /// for a benchmark or test that failed.
    pub fn log_tails(&self) -> String {
        ["replicator", "loader"]
            .into_iter()
            .filter(|which| self.runs.contains_key(which))
            .map(|which| format!("--- {which} log tail:\n{}", self.log_tail(which, 30)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The replicator's `/metrics` text.
    pub async fn replicator_metrics(&self) -> anyhow::Result<String> {
        let text = scrape(&format!(
            "http://{}/metrics",
            self.config.replicator.metrics_listen
        ))
        .await?;
        without_source(&text, &self.config.source)
    }

    /// Waits until the replicator's `/readyz` answers 200: it holds the slot,
    /// finished the initial snapshot and streams.
    pub async fn wait_replicator_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let url = format!("http://{}/readyz", self.config.replicator.metrics_listen);
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if let Ok(response) = http_get(&url).await
                && response
                    .lines()
                    .next()
                    .is_some_and(|status| status.contains(" 200"))
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "replicator not ready after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls the stream until the replicator published its first heartbeat,
    /// which it does only once streaming started (after the initial snapshot).
    pub async fn wait_for_heartbeat(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let js = self.jetstream().await?;
        let subject = sluice_broker::topology::heartbeat_subject(&self.config.source);
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if let Ok(stream) = js.get_stream(self.config.stream_name()).await
                && stream
                    .get_last_raw_message_by_subject(&subject)
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no heartbeat from the replicator within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls `pg_replication_slots` until the replicator's slot confirmed
    /// `lsn` (which the replicator does only for what JetStream acknowledged).
    pub async fn wait_slot_confirmed(
        &mut self,
        lsn: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let pg = self.pg().await?;
        let slot = self.config.postgres.slot.clone();
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let reached: Option<bool> = pg
                .query_one(
                    "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                    &[&lsn, &slot],
                )
                .await?
                .get(0);
            if reached == Some(true) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "slot {slot} did not confirm {lsn} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The loader's `/metrics` text.
    pub async fn loader_metrics(&self) -> anyhow::Result<String> {
        let text = scrape(&format!(
            "http://{}/metrics",
            self.config.loader.metrics_listen
        ))
        .await?;
        without_source(&text, &self.config.source)
    }

    /// Runs [`verify::verify`] once.
    pub async fn verify(&self) -> anyhow::Result<Vec<TableReport>> {
        match &self.verify_url {
            None => Ok(verify::verify(&self.config, None).await?),
            Some(url) => {
                let mut config = self.config.clone();
                config.postgres.url = url.clone();
                Ok(verify::verify(&config, None).await?)
            }
        }
    }

    /// Makes [`Self::verify`] (and [`Self::wait_until_equal`]) compare
    /// ClickHouse with the Postgres at `url` instead of the config's.
    pub fn verify_against(&mut self, url: &str) {
        self.verify_url = Some(url.to_owned());
    }

    /// Polls verify until every table matches; on timeout fails with the last
    /// report (including values of the first differences) and the log tails.
    pub async fn wait_until_equal(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<Vec<TableReport>> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let last = self.verify().await;
            if let Ok(reports) = &last
                && reports.iter().all(TableReport::is_equal)
            {
                return Ok(reports.clone());
            }
            if Instant::now() > deadline {
                let detail = match last {
                    Ok(reports) => reports
                        .iter()
                        .map(|r| format!("{r}\n    {:?}", r.differences.first()))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    Err(e) => format!("verify failed: {e:#}"),
                };
                bail!(
                    "postgres and clickhouse still differ after {timeout:?}:\n{detail}\n\
                     --- replicator log tail:\n{}\n--- loader log tail:\n{}",
                    self.log_tail("replicator", 30),
                    self.log_tail("loader", 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Every message of the pipeline's stream in order, chunk sets
    /// reassembled, each decoded as a package (control messages too; a
    /// message that is no package keeps its decode error). Deleted or absent
    /// sequences are passed over.
    pub async fn stream_messages(&self) -> anyhow::Result<Vec<StreamMessage>> {
        let js = self.jetstream().await?;
        let mut stream = js.get_stream(self.config.stream_name()).await?;
        let info = stream.info().await?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut chunks = sluice_broker::chunk::Reassembler::default();
        let mut messages = Vec::new();
        for sequence in first..=last {
            let message = match stream.get_raw_message(sequence).await {
                Ok(m) => m,
                Err(e) if e.to_string().contains("not found") => continue,
                Err(e) => return Err(e).context(format!("reading stream sequence {sequence}")),
            };
            let encoding = message
                .headers
                .get(sluice_proto::ENCODING_HEADER)
                .map(|v| v.as_str().to_owned());
            let payload = match chunks
                .push(&message.subject, Some(&message.headers), &message.payload)
                .with_context(|| format!("chunk headers of stream sequence {sequence}"))?
            {
                sluice_broker::chunk::Piece::Whole(payload) => payload,
                sluice_broker::chunk::Piece::Part => continue,
            };
            messages.push(StreamMessage {
                sequence,
                subject: message.subject.to_string(),
                package: sluice_proto::decode_with_rows(&payload, encoding.as_deref()),
                encoding,
            });
        }
        Ok(messages)
    }

    /// Every resync the stream holds (its `RESYNC_BEGIN` package), in stream
    /// order: the table's name without the schema, and the reason. Unlike the
    /// replicator's counters, a replicator restart does not reset it.
    pub async fn resyncs_begun_in_stream(&self) -> anyhow::Result<Vec<(String, String)>> {
        Ok(self
            .stream_messages()
            .await?
            .into_iter()
            .filter_map(|message| message.package.ok())
            .filter(|package| package.kind() == sluice_proto::v1::Kind::ResyncBegin)
            .filter_map(|package| Some((package.table, package.resync?.reason)))
            .collect())
    }

    /// How many resyncs of `table` (its name without the schema) for
    /// `reason` the stream holds ([`Pipeline::resyncs_begun_in_stream`]).
    pub async fn resyncs_in_stream(&self, table: &str, reason: &str) -> anyhow::Result<usize> {
        Ok(self
            .resyncs_begun_in_stream()
            .await?
            .iter()
            .filter(|(t, r)| t == table && r == reason)
            .count())
    }

    /// Reads every message of the stream and checks that each data subject's
    /// chain holds every sequence of each generation exactly once (1..N, no
    /// repeats, in stream order). Returns the number of data packages.
    pub async fn check_chains_have_no_duplicates(&self) -> anyhow::Result<u64> {
        let control = format!("sluice.{}._control.", self.config.source);
        let mut chains: BTreeMap<(String, u64), Vec<u64>> = BTreeMap::new();
        let mut packages = 0;
        for message in self.stream_messages().await? {
            if message.subject.starts_with(&control) {
                continue;
            }
            let package = message
                .package
                .with_context(|| format!("decoding stream sequence {}", message.sequence))?;
            let Some(position) = package.position else {
                continue;
            };
            packages += 1;
            chains
                .entry((message.subject, position.generation))
                .or_default()
                .push(position.sequence);
        }
        for ((subject, generation), sequences) in &chains {
            let expected: Vec<u64> = (1..=sequences.len() as u64).collect();
            if *sequences != expected {
                let mut sorted = sequences.clone();
                sorted.sort_unstable();
                let repeats: Vec<u64> = sorted
                    .windows(2)
                    .filter(|w| w[0] == w[1])
                    .map(|w| w[0])
                    .collect();
                bail!(
                    "{subject} generation {generation}: {} packages, sequences not exactly 1..N \
                     in order; repeated: {repeats:?}; first 20: {:?}",
                    sequences.len(),
                    &sequences[..sequences.len().min(20)]
                );
            }
        }
        Ok(packages)
    }
}

/// One message of a pipeline's stream ([`Pipeline::stream_messages`]).
pub struct StreamMessage {
    /// Stream sequence (of the last chunk, for a chunked package).
    pub sequence: u64,
    pub subject: String,
    /// Its `Sluice-Encoding` header (of the last chunk, for a chunked package).
    pub encoding: Option<String>,
    pub package: Result<sluice_proto::v1::Package, sluice_proto::DecodeError>,
}

fn kill_9(child: Option<Child>) -> anyhow::Result<()> {
    let mut child = child.context("not running")?;
    // `Child::kill` is SIGKILL on Unix.
    child.kill().context("kill -9")?;
    child.wait().context("reaping the killed child")?;
    Ok(())
}

/// SIGTERMs `child` (`which`, for messages) and waits (at most 30 s, then
/// SIGKILL); fails if it was not running or did not exit successfully.
pub async fn stop_child(child: Option<Child>, which: &str) -> anyhow::Result<()> {
    let mut child = child.with_context(|| format!("{which} not running"))?;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .context("running kill -TERM")?;
    anyhow::ensure!(status.success(), "kill -TERM {} failed", child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::ensure!(
                status.success(),
                "{which} exited with {status} after SIGTERM"
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{which} did not stop within 30 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for child in [self.replicator.take(), self.loader.take()]
            .into_iter()
            .flatten()
        {
            let _ = kill_9(Some(child));
        }
        if std::env::var_os("SLUICE_TEST_KEEP").is_some() {
            if let Some(temp) = self.temp.take() {
                eprintln!(
                    "pipeline {} kept; logs in {}",
                    self.name,
                    temp.keep().display()
                );
            }
            return;
        }
        if std::thread::panicking()
            && let Some(temp) = self.temp.take()
        {
            eprintln!(
                "pipeline {} logs kept in {}",
                self.name,
                temp.keep().display()
            );
        }
        // The slot would pin WAL on a long-lived server: drop it and the other
        // objects, on a thread with its own runtime (Drop cannot await).
        let servers = self.servers;
        let (name, slot, pg_url, nats_urls, stream) = (
            self.name.clone(),
            self.config.postgres.slot.clone(),
            self.pg_url.clone(),
            self.nats_urls.clone(),
            self.config.stream_name(),
        );
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(cleanup(servers, &name, &slot, &pg_url, &nats_urls, &stream))
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("pipeline cleanup: {e:#}"),
            Err(_) => eprintln!("pipeline cleanup panicked"),
        }
    }
}

/// `GET url` (plain HTTP/1.0 on loopback) and returns the body.
pub async fn scrape(url: &str) -> anyhow::Result<String> {
    let response = http_get(url).await?;
    Ok(response
        .split_once("\r\n\r\n")
        .map_or(response.clone(), |(_, body)| body.to_owned()))
}

/// `GET url` and returns the whole response (status line, headers, body).
async fn http_get(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = url.trim_start_matches("http://");
    let (host, path) = address.split_once('/').unwrap_or((address, ""));
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    stream
        .write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// Prometheus `text` with the `source` label (the first label of every
/// sample) removed, so that tests match series by their own labels; an
/// error when a sample lacks `source="<source>"`.
pub fn without_source(text: &str, source: &str) -> anyhow::Result<String> {
    let label = format!("source=\"{source}\"");
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            out.push_str(line);
        } else if let Some((name, rest)) = line.split_once('{')
            && let Some(rest) = rest.strip_prefix(label.as_str())
        {
            out.push_str(name);
            match rest.strip_prefix(',') {
                Some(more) => {
                    out.push('{');
                    out.push_str(more);
                }
                // Only the source label: `name{source="s"} 1` -> `name 1`.
                None => out.push_str(rest.strip_prefix('}').unwrap_or(rest)),
            }
        } else {
            bail!("the sample {line:?} is not labelled {label}");
        }
        out.push('\n');
    }
    Ok(out)
}

/// Whether Prometheus `text` has a sample line for exactly `series` (name and labels).
pub fn has_sample(text: &str, series: &str) -> bool {
    text.lines().any(|line| {
        line.strip_prefix(series)
            .is_some_and(|rest| rest.starts_with(' '))
    })
}

/// The innermost `{ ... }` of pretty-printed JSON `text` (a `status --json`
/// output) holding `needle`.
pub fn json_object_with<'a>(text: &'a str, needle: &str) -> Option<&'a str> {
    let at = text.find(needle)?;
    let start = text[..at].rfind('{')?;
    let end = at + text[at..].find('}')?;
    Some(&text[start..=end])
}

/// The value text of `"key": value` in a pretty-printed JSON object
/// (strings keep their quotes).
pub fn json_field<'a>(object: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("\"{key}\": ");
    object.lines().find_map(|line| {
        line.trim()
            .strip_prefix(&prefix)
            .map(|value| value.trim_end_matches(','))
    })
}

/// The chunks the replicator reads `table` in with `snapshot_chunk_pages =
/// chunk_pages`: by pages on Postgres 14+, whole before (no TID range scan
/// there).
pub async fn snapshot_chunks(
    pg: &tokio_postgres::Client,
    table: &str,
    chunk_pages: i64,
) -> anyhow::Result<f64> {
    let version = sluice_postgres::version::server_version_num(pg).await?;
    if version < 140000 {
        return Ok(1.0);
    }
    let pages: i64 = pg
        .query_one(
            "SELECT pg_relation_size($1::text::regclass) / current_setting('block_size')::int",
            &[&table],
        )
        .await?
        .get(0);
    Ok(((pages + chunk_pages - 1) / chunk_pages).max(1) as f64)
}

/// The peak resident set size (`VmHWM`) of process `pid`, in kB.
pub fn peak_rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")
}

/// The sum of the samples in Prometheus text `text` whose line starts with
/// `name_and_labels` (e.g. `sluice_loaded_rows_total{table="public.t"`);
/// `None` when there is no such sample.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// A count from environment variable `var` (`1_000_000` and `1,000,000`
/// accepted), else `default`.
pub fn count_from_env(var: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(var) {
        Ok(v) => v
            .replace(['_', ','], "")
            .parse()
            .with_context(|| format!("{var}={v:?} is not a count")),
        Err(_) => Ok(default),
    }
}

/// A small deterministic PRNG (xorshift64*), so workloads need no extra crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock; the seed is printed so a failure can be replayed.
    pub fn from_clock() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        eprintln!("rng seed {seed}");
        Rng(seed)
    }

    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// SQL of the table [`run_workload`] writes to.
pub fn workload_table_sql(table: &str) -> String {
    format!("CREATE TABLE {table} (id bigint PRIMARY KEY, v bigint NOT NULL, s text)")
}

/// Runs `transactions` transactions of about `changes_per_transaction` row
/// changes each on `table` (see [`workload_table_sql`]): half inserts, 30 %
/// updates, 20 % deletes of random live rows. Rows already in the table are
/// live rows too, and new ids start above the largest one, so a table can
/// take several workloads. Returns the number of changes.
pub async fn run_workload(
    pg: &tokio_postgres::Client,
    table: &str,
    transactions: usize,
    changes_per_transaction: usize,
    mut rng: Rng,
) -> anyhow::Result<u64> {
    let mut live: Vec<i64> = pg
        .query(&format!("SELECT id FROM {table} ORDER BY id"), &[])
        .await
        .with_context(|| format!("reading the ids of {table}"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut next_id: i64 = live.last().map_or(1, |max| max + 1);
    let mut changes = 0u64;
    for _ in 0..transactions {
        let mut inserts = Vec::new();
        let mut updates = Vec::new();
        let mut deletes = Vec::new();
        for _ in 0..changes_per_transaction {
            let roll = rng.below(10);
            if roll < 5 || live.len() < 10 {
                inserts.push(next_id);
                live.push(next_id);
                next_id += 1;
            } else {
                let i = rng.below(live.len() as u64) as usize;
                if roll < 8 {
                    updates.push(live[i]);
                } else {
                    deletes.push(live.swap_remove(i));
                }
            }
        }
        // Updates of rows deleted in the same transaction just update fewer rows.
        let mut sql = String::from("BEGIN;");
        if !inserts.is_empty() {
            let values: Vec<String> = inserts
                .iter()
                .map(|id| format!("({id}, {}, md5('{id}'))", rng.below(1_000_000)))
                .collect();
            sql.push_str(&format!("INSERT INTO {table} VALUES {};", values.join(",")));
        }
        let list = |ids: &[i64]| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        if !updates.is_empty() {
            sql.push_str(&format!(
                "UPDATE {table} SET v = v + 1, s = md5(s) WHERE id IN ({});",
                list(&updates)
            ));
        }
        if !deletes.is_empty() {
            sql.push_str(&format!(
                "DELETE FROM {table} WHERE id IN ({});",
                list(&deletes)
            ));
        }
        sql.push_str("COMMIT;");
        pg.batch_execute(&sql)
            .await
            .context("running a workload transaction")?;
        changes += (inserts.len() + updates.len() + deletes.len()) as u64;
    }
    Ok(changes)
}

/// Drops the pipeline's slot, Postgres database, stream and ClickHouse database.
async fn cleanup(
    servers: &Servers,
    name: &str,
    slot: &str,
    pg_url: &str,
    nats_urls: &str,
    stream: &str,
) -> anyhow::Result<()> {
    let admin = Servers::pg_connect(&servers.pg_url).await?;
    // The killed replicator's walsender may take a moment to go away.
    for _ in 0..50 {
        let active: Option<bool> = admin
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .map(|r| r.get(0));
        match active {
            None => break,
            Some(false) => {
                admin
                    .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                    .await?;
                break;
            }
            Some(true) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let db = url::Url::parse(pg_url)?
        .path()
        .trim_start_matches('/')
        .to_owned();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
        .await?;
    let urls: Vec<&str> = nats_urls.split(',').collect();
    let js = jetstream::new(servers.nats_connect(&urls).await?);
    let _ = js.delete_stream(stream).await;
    servers
        .clickhouse_sql(&format!("DROP DATABASE IF EXISTS `{name}`"))
        .await?;
    Ok(())
}

/// The benchmarks' rows: inserts ids `1..=rows` of `(id bigint, v bigint,
/// s text)` into `table` as `(g, g * 7, md5(g))`, `per_transaction` rows per
/// transaction.
pub async fn insert_bench_rows(
    pg: &tokio_postgres::Client,
    table: &str,
    rows: u64,
    per_transaction: u64,
) -> anyhow::Result<()> {
    let mut first = 1u64;
    while first <= rows {
        let last = (first + per_transaction.max(1) - 1).min(rows);
        pg.batch_execute(&format!(
            "INSERT INTO {table} SELECT g, g * 7, md5(g::text) FROM generate_series({first}, {last}) g"
        ))
        .await
        .with_context(|| format!("inserting rows {first}..={last} into {table}"))?;
        first = last + 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_label_is_required_and_removed() {
        let text = "# TYPE a counter\na{source=\"s\"} 1\nb{source=\"s\",table=\"public.t\"} 2\n";
        assert_eq!(
            without_source(text, "s").unwrap(),
            "# TYPE a counter\na 1\nb{table=\"public.t\"} 2\n"
        );
        assert!(without_source("a{table=\"x\"} 1\n", "s").is_err());
        assert!(without_source("a{source=\"other\"} 1\n", "s").is_err());
        assert!(without_source("a 1\n", "s").is_err());
    }
}
