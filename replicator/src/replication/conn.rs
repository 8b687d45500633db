//! The replication connection's command phase: connecting (each configured
//! host in turn), and the simple-query commands of a walsender
//! (`IDENTIFY_SYSTEM`, slots, `START_REPLICATION`). Framing is in
//! [`super::wire`], TLS and authentication in [`super::startup`].

use std::path::Path;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{DataRowBody, Message};
use postgres_protocol::message::frontend;
use sluice_broker::table::quote_ident;
use tokio::net::TcpStream;
use tokio_postgres::config::{Host, TargetSessionAttrs};

use super::error::{ProtocolError, ReplicationError};
use super::lsn::Lsn;
use super::startup::{Session, negotiate_tls, startup};
use super::wire::{AsyncIo, Connection, server_error, unexpected};
use crate::recovery::{self, Recovery};
use sluice_postgres::tls::{SslMode, TlsOptions};

/// What `IDENTIFY_SYSTEM` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's unique system identifier (changes when the cluster is
    /// re-created with initdb: a different id means slots and LSNs are gone).
    pub system_id: u64,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush location.
    pub xlogpos: Lsn,
    /// The database connected to (always set for `replication=database`).
    pub dbname: Option<String>,
}

/// What `CREATE_REPLICATION_SLOT … LOGICAL pgoutput` (exporting a snapshot) reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// The slot's name.
    pub slot_name: String,
    /// The LSN at which the slot became consistent: every transaction that
    /// commits after it is streamed; everything before it is in the snapshot.
    pub consistent_point: Lsn,
    /// The exported snapshot, for `SET TRANSACTION SNAPSHOT`. It lives only
    /// until the next command on this connection or its close.
    pub snapshot_name: String,
}

/// A connection in the streaming-replication protocol (`replication=database`),
/// before `START_REPLICATION`.
pub struct ReplicationClient {
    pub(crate) conn: Connection,
    backend_pid: i32,
    /// `server_version_num`, once asked ([`ReplicationClient::server_version_num`]).
    server_version_num: Option<i32>,
}

impl std::fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationClient")
            .field("backend_pid", &self.backend_pid)
            .finish_non_exhaustive()
    }
}

impl ReplicationClient {
    /// Connects with the host, port, user, password, dbname, application name
    /// and `sslmode` (disable / prefer / require; no certificate verification
    /// for the latter two, like libpq) of `config`.
    ///
    /// Hosts are tried in order; the first that accepts the connection wins.
    /// `connect_timeout` bounds each attempt (TCP, TLS and authentication).
    pub async fn connect(config: &tokio_postgres::Config) -> Result<Self, ReplicationError> {
        let tls = TlsOptions {
            mode: SslMode::from(config.get_ssl_mode()),
            ..TlsOptions::default()
        };
        Self::connect_with_tls(config, &tls).await
    }

    /// Like [`ReplicationClient::connect`], with explicit TLS settings (e.g.
    /// `verify-full` with a root certificate), ignoring `config`'s `sslmode`.
    pub async fn connect_with_tls(
        config: &tokio_postgres::Config,
        tls: &TlsOptions,
    ) -> Result<Self, ReplicationError> {
        Self::open(config, tls, Session::Replication).await
    }

    /// Connects as [`ReplicationClient::connect_with_tls`] does, for a
    /// `session` of either kind.
    pub(crate) async fn open(
        config: &tokio_postgres::Config,
        tls: &TlsOptions,
        session: Session,
    ) -> Result<Self, ReplicationError> {
        let hosts = config.get_hosts();
        if hosts.is_empty() {
            return Err(ReplicationError::Config("no host configured"));
        }
        let ports = config.get_ports();
        if ports.len() > 1 && ports.len() != hosts.len() {
            return Err(ReplicationError::Config(
                "the number of ports must be 1 or match the hosts",
            ));
        }
        let mut last_err = None;
        for (i, host) in hosts.iter().enumerate() {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let attempt = Self::connect_host(config, tls, host, port, session);
            let result = match config.get_connect_timeout() {
                Some(limit) => tokio::time::timeout(*limit, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(ReplicationError::ConnectTimeout {
                            host: host_label(host),
                            port,
                        })
                    }),
                None => attempt.await,
            };
            match result {
                Ok(mut client) => {
                    // `target_session_attrs=read-write`: a standby (after a
                    // failover, the old primary come back as one) is passed
                    // over for the next host.
                    if config.get_target_session_attrs() == TargetSessionAttrs::ReadWrite
                        && client.read_only().await?
                    {
                        let _ = client.close().await;
                        last_err = Some(ReplicationError::ReadOnly {
                            host: host_label(host),
                            port,
                        });
                        continue;
                    }
                    client
                        .simple_query(sluice_postgres::NEWER_TIMEOUTS_OFF)
                        .await?;
                    return Ok(client);
                }
                // Only a failure to reach the host moves on to the next one;
                // a rejected password would be rejected everywhere.
                Err(e) if recovery::of_replication(&e) == Recovery::Retry => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(ReplicationError::Closed))
    }

    async fn connect_host(
        config: &tokio_postgres::Config,
        tls: &TlsOptions,
        host: &Host,
        port: u16,
        session: Session,
    ) -> Result<Self, ReplicationError> {
        let io: Box<dyn AsyncIo> = match host {
            Host::Tcp(name) => {
                let tcp = TcpStream::connect((name.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                negotiate_tls(tcp, name, tls).await?
            }
            #[cfg(unix)]
            Host::Unix(dir) => {
                let path = Path::new(dir).join(format!(".s.PGSQL.{port}"));
                Box::new(tokio::net::UnixStream::connect(path).await?)
            }
        };
        let mut conn = Connection::new(io);
        let backend_pid = startup(&mut conn, config, session).await?;
        Ok(ReplicationClient {
            conn,
            backend_pid,
            server_version_num: None,
        })
    }

    /// The server process id of this connection's walsender (`pid` in
    /// `pg_stat_replication` and `active_pid` in `pg_replication_slots`).
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// The server's version as it reported it at startup (`server_version`,
    /// e.g. `13.23`), for messages; [`ReplicationClient::server_version_num`]
    /// is the one to compare.
    pub fn server_version(&self) -> Option<&str> {
        self.conn.server_version.as_deref()
    }

    /// Whether the server is a standby (`pg_is_in_recovery()`).
    pub async fn in_recovery(&mut self) -> Result<bool, ReplicationError> {
        const CMD: &str = "SELECT pg_is_in_recovery()";
        let rows = self.simple_query(CMD).await?;
        let row = single_row(CMD, rows)?;
        parse_col(CMD, "pg_is_in_recovery", &row, 0, |s| Some(s == "t"))
    }

    /// Whether the server only reads (`SHOW transaction_read_only`: a standby).
    pub async fn read_only(&mut self) -> Result<bool, ReplicationError> {
        const CMD: &str = "SHOW transaction_read_only";
        let rows = self.simple_query(CMD).await?;
        let row = single_row(CMD, rows)?;
        parse_col(CMD, "transaction_read_only", &row, 0, |s| Some(s == "on"))
    }

    /// `SHOW server_version_num` (e.g. `130023` for 13.23), asked once per
    /// connection. Where the walsender's commands differ between versions,
    /// this decides which form is sent.
    pub async fn server_version_num(&mut self) -> Result<i32, ReplicationError> {
        if let Some(version) = self.server_version_num {
            return Ok(version);
        }
        const CMD: &str = "SHOW server_version_num";
        let rows = self.command(CMD).await?;
        let row = single_row(CMD, rows)?;
        let version = parse_col(CMD, "server_version_num", &row, 0, |s| s.parse().ok())?;
        self.server_version_num = Some(version);
        Ok(version)
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        const CMD: &str = "IDENTIFY_SYSTEM";
        let rows = self.command(CMD).await?;
        let row = single_row(CMD, rows)?;
        Ok(SystemIdentity {
            system_id: parse_col(CMD, "systemid", &row, 0, |s| s.parse().ok())?,
            timeline: parse_col(CMD, "timeline", &row, 1, |s| s.parse().ok())?,
            xlogpos: parse_col(CMD, "xlogpos", &row, 2, |s| s.parse().ok())?,
            dbname: row.get(3).cloned().flatten(),
        })
    }

    /// Creates a logical pgoutput slot that exports a snapshot:
    /// `CREATE_REPLICATION_SLOT "name" [TEMPORARY] LOGICAL pgoutput` with
    /// `(SNAPSHOT 'export')` on Postgres 15+, `EXPORT_SNAPSHOT` before (the
    /// only form 13 and 14 know; see [`create_slot_command`]).
    ///
    /// The exported snapshot stays valid only while this connection stays
    /// idle: the next command on it (or closing it) ends the snapshot. A
    /// temporary slot is dropped when this connection closes.
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        temporary: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        const CMD: &str = "CREATE_REPLICATION_SLOT";
        let version = self.server_version_num().await?;
        // A standby cannot make a failover slot (only a primary's are copied).
        let failover = !temporary
            && sluice_postgres::version::has_failover_slots(version)
            && !self.in_recovery().await?;
        let sql = create_slot_command(name, temporary, failover, version);
        let rows = self.command(&sql).await?;
        let row = single_row(CMD, rows)?;
        Ok(CreatedSlot {
            slot_name: parse_col(CMD, "slot_name", &row, 0, |s| Some(s.to_owned()))?,
            consistent_point: parse_col(CMD, "consistent_point", &row, 1, |s| s.parse().ok())?,
            snapshot_name: parse_col(CMD, "snapshot_name", &row, 2, |s| Some(s.to_owned()))?,
        })
    }

    /// `DROP_REPLICATION_SLOT "name" [WAIT]`. Without `wait`, dropping a slot
    /// that another connection is using fails with SQLSTATE 55006; with it,
    /// the command waits until the slot is released.
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), ReplicationError> {
        let sql = format!(
            "DROP_REPLICATION_SLOT {}{}",
            quote_ident(name),
            if wait { " WAIT" } else { "" }
        );
        self.command(&sql).await.map(drop)
    }

    /// Runs a replication command; a server error names it and the server's
    /// version ([`ReplicationError::Command`]).
    async fn command(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        self.simple_query(sql)
            .await
            .map_err(|e| self.command_error(sql, e))
    }

    /// Turns a server error of the command `sql` into [`ReplicationError::Command`].
    pub(crate) fn command_error(&self, sql: &str, error: ReplicationError) -> ReplicationError {
        match error {
            ReplicationError::Server(error) => ReplicationError::Command {
                command: sql.to_owned(),
                server_version: self.conn.server_version.clone(),
                error,
            },
            other => other,
        }
    }

    /// Runs a command with the simple-query protocol and returns the text
    /// values of all rows (of all result sets, in order), `None` for NULL.
    ///
    /// On a walsender connection this takes replication commands
    /// (`READ_REPLICATION_SLOT`, `TIMELINE_HISTORY`, `SHOW`) and, for
    /// `replication=database`, plain SQL. Commands that start a COPY are
    /// rejected with a protocol error (use [`ReplicationClient::start_replication`]).
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        frontend::query(sql, &mut self.conn.write_buf)
            .map_err(|_| ReplicationError::Config("query contains a NUL byte"))?;
        self.conn.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.conn.read_message("running a simple query").await? {
                Message::RowDescription(_)
                | Message::CommandComplete(_)
                | Message::EmptyQueryResponse => {}
                Message::DataRow(body) => rows.push(text_row(&body)?),
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => break,
                other => return Err(unexpected(&other, "running a simple query")),
            }
        }
        match error {
            Some(e) => Err(ReplicationError::Server(e)),
            None => Ok(rows),
        }
    }

    #[cfg(test)]
    pub(crate) fn for_test(io: Box<dyn AsyncIo>) -> Self {
        ReplicationClient {
            conn: Connection::new(io),
            backend_pid: 0,
            server_version_num: None,
        }
    }

    /// Sends `Terminate` and closes the socket. Dropping the client also
    /// closes it, without the courtesy message.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        frontend::terminate(&mut self.conn.write_buf);
        self.conn.flush().await?;
        self.conn.shutdown().await?;
        Ok(())
    }
}

/// The `CREATE_REPLICATION_SLOT` command for a logical pgoutput slot that
/// exports its snapshot, in the syntax of the server's `server_version_num`:
/// Postgres 15 introduced the option list `(SNAPSHOT 'export')`; 13 and 14
/// accept only the older keyword `EXPORT_SNAPSHOT` (which 15–18 still take,
/// but as the legacy form). With `failover` (17+, a lasting slot on a
/// primary) it is a failover slot, which standbys running
/// `sync_replication_slots` copy, so that it survives a promotion.
pub fn create_slot_command(
    name: &str,
    temporary: bool,
    failover: bool,
    server_version_num: i32,
) -> String {
    let snapshot = if failover && sluice_postgres::version::has_failover_slots(server_version_num) {
        "(SNAPSHOT 'export', FAILOVER)"
    } else if sluice_postgres::version::has_create_slot_options(server_version_num) {
        "(SNAPSHOT 'export')"
    } else {
        "EXPORT_SNAPSHOT"
    };
    format!(
        "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput {snapshot}",
        quote_ident(name),
        if temporary { " TEMPORARY" } else { "" },
    )
}

/// Formats publication names as the value of the `publication_names`
/// option: a comma-separated list of double-quoted identifiers (the
/// replication command grammar quotes identifiers as SQL does).
pub fn publication_names<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(quote_ident)
        .collect::<Vec<_>>()
        .join(",")
}

/// Single-quotes a literal for the replication command grammar. The
/// replication scanner knows only standard strings (`'` doubled inside,
/// backslash is an ordinary character), not `E'…'`.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn host_label(host: &Host) -> String {
    match host {
        Host::Tcp(name) => name.clone(),
        #[cfg(unix)]
        Host::Unix(dir) => dir.display().to_string(),
    }
}

fn text_row(body: &DataRowBody) -> Result<Vec<Option<String>>, ReplicationError> {
    let buf = body.buffer();
    let mut ranges = body.ranges();
    let mut row = Vec::new();
    while let Some(range) = ranges.next().map_err(ProtocolError::Malformed)? {
        row.push(match range {
            None => None,
            Some(range) => {
                let bytes = buf.get(range).ok_or(ProtocolError::NotUtf8)?;
                Some(
                    std::str::from_utf8(bytes)
                        .map_err(|_| ProtocolError::NotUtf8)?
                        .to_owned(),
                )
            }
        });
    }
    Ok(row)
}

fn single_row(
    command: &'static str,
    mut rows: Vec<Vec<Option<String>>>,
) -> Result<Vec<Option<String>>, ReplicationError> {
    if rows.len() != 1 {
        return Err(ProtocolError::BadResult {
            command,
            column: "(row count)",
            value: Some(rows.len().to_string()),
        }
        .into());
    }
    Ok(rows.remove(0))
}

fn parse_col<T>(
    command: &'static str,
    column: &'static str,
    row: &[Option<String>],
    index: usize,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, ReplicationError> {
    let value = row.get(index).cloned().flatten();
    value.as_deref().and_then(parse).ok_or_else(|| {
        ProtocolError::BadResult {
            command,
            column,
            value,
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers_and_literals() {
        // Identifiers are quoted by `sluice_broker::table::quote_ident`, as in SQL.
        assert_eq!(quote_literal("1"), "'1'");
        assert_eq!(quote_literal("it's \\ ok"), "'it''s \\ ok'");
        assert_eq!(publication_names(["p1", "we\"ird"]), "\"p1\",\"we\"\"ird\"");
    }

    #[test]
    fn create_slot_command_follows_the_server_version() {
        // 13 and 14 know only EXPORT_SNAPSHOT; 15 added the option list; 17
        // failover slots. Asking for failover before 17 changes nothing.
        for version in [130000, 130023, 140023, 149999] {
            for failover in [false, true] {
                assert_eq!(
                    create_slot_command("s", false, failover, version),
                    "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput EXPORT_SNAPSHOT"
                );
            }
            assert_eq!(
                create_slot_command("s", true, false, version),
                "CREATE_REPLICATION_SLOT \"s\" TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"
            );
        }
        for version in [150000, 150018, 160014, 170010, 180004] {
            let failover = if version >= 170000 { ", FAILOVER" } else { "" };
            assert_eq!(
                create_slot_command("s", false, true, version),
                format!(
                    "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput (SNAPSHOT 'export'{failover})"
                )
            );
            assert_eq!(
                create_slot_command("s", false, false, version),
                "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput (SNAPSHOT 'export')"
            );
            assert_eq!(
                create_slot_command("we\"ird", true, false, version),
                "CREATE_REPLICATION_SLOT \"we\"\"ird\" TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')"
            );
        }
    }
}
