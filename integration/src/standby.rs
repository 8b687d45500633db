//! A Postgres primary with a streaming physical standby, started by a test
//! for itself on a given major version (installed by `scripts/install-postgres`
//! when missing), whatever version the shared stack runs. Both listen on
//! loopback ports of this process and are stopped when the [`PgPair`] drops.
//!
//! The standby is made the way an operator without `pg_basebackup` would:
//! a low-level base backup (`pg_backup_start`, a copy of the data directory,
//! `pg_backup_stop`'s backup label), `standby.signal`, `primary_conninfo`, a
//! physical slot on the primary (`primary_slot_name`) and
//! `hot_standby_feedback = on`, which logical decoding on a standby needs so
//! that the primary keeps the catalog rows the standby's slots still read.
//! `wal_sender_timeout` is 10 s (not 60): a walsender whose client was killed
//! holds its slot until it notices, and a restarted replicator waits that long.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::pipeline::free_port;

/// A primary and its standby.
pub struct PgPair {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    failover: bool,
    pub primary_port: u16,
    pub standby_port: u16,
}

impl PgPair {
    /// Starts a primary and a standby of Postgres `major` (16 or newer for
    /// logical decoding on the standby).
    pub async fn start(major: u32) -> anyhow::Result<PgPair> {
        Self::start_with(major, false).await
    }

    /// [`PgPair::start`]; with `failover` (17+), the standby keeps copies of
    /// the primary's failover slots (`sync_replication_slots = on`) and the
    /// primary's logical walsenders send nothing the standby has not received
    /// (`synchronized_standby_slots`), so that a promoted standby can go on
    /// where the primary's slot was.
    pub async fn start_with(major: u32, failover: bool) -> anyhow::Result<PgPair> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new(repo.join("scripts/install-postgres"))
            .arg(major.to_string())
            .output()
            .context("running scripts/install-postgres")?;
        ensure!(
            out.status.success(),
            "scripts/install-postgres {major} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = PathBuf::from(String::from_utf8(out.stdout)?.trim());
        let as_postgres =
            String::from_utf8(Command::new("id").arg("-u").output()?.stdout)?.trim() == "0";
        let dir = tempfile::Builder::new()
            .prefix("sluice-standby-")
            .tempdir()?;
        if as_postgres {
            run(Command::new("chown").arg("postgres:").arg(dir.path()))?;
            run(Command::new("chmod").arg("755").arg(dir.path()))?;
        }
        let pair = PgPair {
            dir,
            bin,
            as_postgres,
            failover,
            primary_port: free_port()?,
            standby_port: free_port()?,
        };
        pair.start_primary().await?;
        pair.start_standby().await?;
        Ok(pair)
    }

    fn primary_dir(&self) -> PathBuf {
        self.dir.path().join("primary")
    }

    fn standby_dir(&self) -> PathBuf {
        self.dir.path().join("standby")
    }

    /// `postgres://postgres@127.0.0.1:<primary>/<database>`.
    pub fn primary_url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}",
            self.primary_port
        )
    }

    /// `postgres://postgres@127.0.0.1:<standby>/<database>`.
    pub fn standby_url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}",
            self.standby_port
        )
    }

    /// Both servers, the writable one chosen at connect time
    /// (`target_session_attrs=read-write`): what a client that follows a
    /// failover is given. The standby comes first, so that a client ignoring
    /// the attribute lands on it.
    pub fn writable_url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{database}?target_session_attrs=read-write",
            self.standby_port, self.primary_port
        )
    }

    /// Stops the primary at once (`pg_ctl stop -m immediate`: a crash).
    pub fn crash_primary(&self) -> anyhow::Result<()> {
        run(self
            .command("pg_ctl")
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(self.primary_dir()))
    }

    /// Promotes the standby and waits until it accepts writes.
    pub fn promote(&self) -> anyhow::Result<()> {
        run(self
            .command("pg_ctl")
            .args(["promote", "-w", "-t", "60", "-D"])
            .arg(self.standby_dir()))
    }

    /// A connection to `database` on the primary.
    pub async fn primary(&self, database: &str) -> anyhow::Result<tokio_postgres::Client> {
        crate::Servers::pg_connect(&self.primary_url(database)).await
    }

    /// A connection to `database` on the standby.
    pub async fn standby(&self, database: &str) -> anyhow::Result<tokio_postgres::Client> {
        crate::Servers::pg_connect(&self.standby_url(database)).await
    }

    /// Waits until the standby replayed everything the primary wrote so far.
    pub async fn wait_replayed(&self, timeout: Duration) -> anyhow::Result<()> {
        let primary = self.primary("postgres").await?;
        let standby = self.standby("postgres").await?;
        let target = crate::wal_insert_lsn(&primary).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let done: Option<bool> = standby
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&target],
                )
                .await?
                .get(0);
            if done == Some(true) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the standby did not replay {target} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A server program of this version, as the server's user.
    fn command(&self, program: &str) -> Command {
        self.as_server_user(self.bin.join(program))
    }

    fn as_server_user(&self, path: impl AsRef<std::ffi::OsStr>) -> Command {
        if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl_start(&self, data: &Path) -> anyhow::Result<()> {
        let log = data.with_extension("log");
        run(self
            .command("pg_ctl")
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(data)
            .arg("-l")
            .arg(&log))
        .with_context(|| {
            format!(
                "starting {}: {}",
                data.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
    }

    async fn start_primary(&self) -> anyhow::Result<()> {
        let data = self.primary_dir();
        run(self
            .command("initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data))?;
        self.append(
            &data.join("postgresql.conf"),
            &format!(
                "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n\
                 wal_level = logical\nmax_replication_slots = 32\nmax_wal_senders = 32\n\
                 hot_standby = on\nfsync = off\nsynchronous_commit = off\n\
                 wal_sender_timeout = '10s'\n{}",
                self.primary_port,
                if self.failover {
                    "synchronized_standby_slots = 'sluice_standby'\n"
                } else {
                    ""
                }
            ),
        )?;
        self.append(
            &data.join("pg_hba.conf"),
            "host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n",
        )?;
        self.pg_ctl_start(&data)
    }

    async fn start_standby(&self) -> anyhow::Result<()> {
        let primary = self.primary("postgres").await?;
        primary
            .execute(
                "SELECT pg_create_physical_replication_slot('sluice_standby', true)",
                &[],
            )
            .await?;
        // The low-level base backup: the session that starts it must stop it.
        primary
            .execute("SELECT pg_backup_start('sluice standby', true)", &[])
            .await?;
        let data = self.standby_dir();
        run(self
            .as_server_user("cp")
            .arg("-a")
            .arg(self.primary_dir())
            .arg(&data))?;
        let label: String = primary
            .query_one("SELECT labelfile FROM pg_backup_stop(true)", &[])
            .await?
            .get(0);
        // What belongs to the running primary, not to the copy.
        for file in ["postmaster.pid", "postmaster.opts"] {
            let _ = std::fs::remove_file(data.join(file));
        }
        for dir in ["pg_wal", "pg_replslot"] {
            for entry in std::fs::read_dir(data.join(dir))? {
                let path = entry?.path();
                if path.is_file() {
                    std::fs::remove_file(&path)?;
                } else if dir == "pg_replslot" {
                    std::fs::remove_dir_all(&path)?;
                }
            }
        }
        self.append(&data.join("backup_label"), &label)?;
        self.append(&data.join("standby.signal"), "")?;
        self.append(
            &data.join("postgresql.conf"),
            &format!(
                "port = {}\n\
                 primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname=postgres'\n\
                 primary_slot_name = 'sluice_standby'\nhot_standby_feedback = on\n{}",
                self.standby_port,
                self.primary_port,
                // The copy carries the primary's `synchronized_standby_slots`;
                // once promoted, a slot it names that does not exist there
                // would hold every logical walsender back.
                if self.failover {
                    "sync_replication_slots = on\nsynchronized_standby_slots = ''\n"
                } else {
                    ""
                }
            ),
        )?;
        self.pg_ctl_start(&data)?;
        let standby = self.standby("postgres").await?;
        let recovering: bool = standby
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await?
            .get(0);
        if !recovering {
            bail!("the standby is not in recovery");
        }
        Ok(())
    }

    /// Appends `text` to `path` (created if missing), owned by the server's user.
    fn append(&self, path: &Path, text: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        if self.as_postgres {
            run(Command::new("chown").arg("postgres:").arg(path))?;
        }
        Ok(())
    }
}

impl Drop for PgPair {
    fn drop(&mut self) {
        for data in [self.standby_dir(), self.primary_dir()] {
            let _ = self
                .command("pg_ctl")
                .args(["stop", "-m", "immediate", "-w", "-D"])
                .arg(&data)
                .output();
        }
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
