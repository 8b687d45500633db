//! The replication connection before streaming: framing, startup,
//! authentication, TLS, and the simple-query commands of a walsender.

use std::io;
use std::path::Path;

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::{DataRowBody, Header, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::Host;

use super::error::{AuthError, ProtocolError, ReplicationError, ServerError, TlsError};
use super::lsn::Lsn;
use super::stream::ReplicationStream;
use super::tls::{self, SslMode, TlsOptions};

/// A socket, plain or TLS, TCP or Unix.
pub(crate) trait AsyncIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncIo for T {}

/// One backend message, including the one `postgres-protocol` does not parse.
pub(crate) enum Backend {
    /// Any message `postgres_protocol` knows.
    Message(Message),
    /// `CopyBothResponse` ('W'), sent by START_REPLICATION. `postgres-protocol`
    /// 0.6 has no variant for it and rejects the tag, so it is framed here.
    CopyBothResponse,
}

/// Framing and buffers shared by [`ReplicationClient`] and [`ReplicationStream`].
///
/// Both buffers live in the struct so that an `await` cancelled half-way
/// loses nothing: bytes read stay in `read_buf` until a whole message is
/// there, bytes not yet written stay in `write_buf` and go out first on the
/// next flush.
pub(crate) struct Connection {
    io: Box<dyn AsyncIo>,
    read_buf: BytesMut,
    pub(crate) write_buf: BytesMut,
}

const READ_CHUNK: usize = 64 * 1024;

impl Connection {
    pub(crate) fn new(io: Box<dyn AsyncIo>) -> Self {
        Connection {
            io,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::with_capacity(1024),
        }
    }

    /// Reads one backend message. Cancel-safe: the only `.await` is a read
    /// into `read_buf`, and a message is split off the buffer only when it is
    /// returned.
    pub(crate) async fn read_backend(&mut self) -> Result<Backend, ReplicationError> {
        loop {
            if let Some(message) = parse_frame(&mut self.read_buf)? {
                return Ok(message);
            }
            if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 4 {
                self.read_buf.reserve(READ_CHUNK);
            }
            let n = self.io.read_buf(&mut self.read_buf).await?;
            if n == 0 {
                return Err(ReplicationError::Closed);
            }
        }
    }

    /// Reads the next message that matters to the protocol state machine,
    /// logging notices and skipping parameter status reports.
    pub(crate) async fn read_message(
        &mut self,
        state: &'static str,
    ) -> Result<Message, ReplicationError> {
        loop {
            match self.read_backend().await? {
                Backend::CopyBothResponse => {
                    return Err(ProtocolError::Unexpected { tag: 'W', state }.into());
                }
                Backend::Message(Message::NoticeResponse(body)) => {
                    if let Ok(notice) = ServerError::from_fields(body.fields()) {
                        tracing::info!(
                            severity = %notice.severity,
                            code = %notice.code,
                            message = %notice.message,
                            "postgres notice on the replication connection"
                        );
                    }
                }
                Backend::Message(Message::ParameterStatus(_)) => {}
                Backend::Message(message) => return Ok(message),
            }
        }
    }

    /// Writes out `write_buf`. If cancelled, the unwritten rest stays queued
    /// and is written (in order) by the next flush.
    pub(crate) async fn flush(&mut self) -> Result<(), ReplicationError> {
        while !self.write_buf.is_empty() {
            let n = self.io.write(&self.write_buf).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            self.write_buf.advance(n);
        }
        self.io.flush().await?;
        Ok(())
    }

    /// After an `ErrorResponse`, the server still sends `ReadyForQuery`; read
    /// up to it so the connection stays usable, then hand back the error.
    async fn drain_to_ready(&mut self) -> Result<(), ReplicationError> {
        loop {
            if let Message::ReadyForQuery(_) = self.read_message("draining after an error").await? {
                return Ok(());
            }
        }
    }
}

fn parse_frame(buf: &mut BytesMut) -> Result<Option<Backend>, ProtocolError> {
    let Some(header) = Header::parse(buf).map_err(ProtocolError::Malformed)? else {
        return Ok(None);
    };
    // `Header::parse` checked len >= 4, so this is at least 5.
    let total = header.len() as usize + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    if header.tag() == b'W' {
        // CopyBothResponse: overall format (1 byte) and column formats; for
        // replication always binary with zero columns, nothing to keep.
        buf.advance(total);
        return Ok(Some(Backend::CopyBothResponse));
    }
    match Message::parse(buf).map_err(ProtocolError::Malformed)? {
        Some(message) => Ok(Some(Backend::Message(message))),
        None => Err(ProtocolError::Malformed(io::Error::new(
            io::ErrorKind::InvalidData,
            "complete frame not parsed",
        ))),
    }
}

fn server_error(body: &postgres_protocol::message::backend::ErrorResponseBody) -> Box<ServerError> {
    match ServerError::from_fields(body.fields()) {
        Ok(e) => Box::new(e),
        Err(_) => Box::new(ServerError {
            severity: "ERROR".to_owned(),
            code: String::new(),
            message: "malformed ErrorResponse".to_owned(),
            detail: None,
            hint: None,
        }),
    }
}

pub(crate) fn unexpected(message: &Message, state: &'static str) -> ReplicationError {
    let tag = match message {
        Message::AuthenticationOk
        | Message::AuthenticationCleartextPassword
        | Message::AuthenticationMd5Password(_)
        | Message::AuthenticationSasl(_)
        | Message::AuthenticationSaslContinue(_)
        | Message::AuthenticationSaslFinal(_)
        | Message::AuthenticationGss
        | Message::AuthenticationGssContinue(_)
        | Message::AuthenticationKerberosV5
        | Message::AuthenticationScmCredential
        | Message::AuthenticationSspi => 'R',
        Message::BackendKeyData(_) => 'K',
        Message::BindComplete => '2',
        Message::CloseComplete => '3',
        Message::CommandComplete(_) => 'C',
        Message::CopyData(_) => 'd',
        Message::CopyDone => 'c',
        Message::CopyInResponse(_) => 'G',
        Message::CopyOutResponse(_) => 'H',
        Message::DataRow(_) => 'D',
        Message::EmptyQueryResponse => 'I',
        Message::ErrorResponse(_) => 'E',
        Message::NoData => 'n',
        Message::NoticeResponse(_) => 'N',
        Message::NotificationResponse(_) => 'A',
        Message::ParameterDescription(_) => 't',
        Message::ParameterStatus(_) => 'S',
        Message::ParseComplete => '1',
        Message::PortalSuspended => 's',
        Message::ReadyForQuery(_) => 'Z',
        Message::RowDescription(_) => 'T',
        _ => '?',
    };
    ProtocolError::Unexpected { tag, state }.into()
}

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

/// What `CREATE_REPLICATION_SLOT … LOGICAL pgoutput (SNAPSHOT 'export')` reports.
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
            root_cert: None,
        };
        Self::connect_with_tls(config, &tls).await
    }

    /// Like [`ReplicationClient::connect`], with explicit TLS settings (e.g.
    /// `verify-full` with a root certificate), ignoring `config`'s `sslmode`.
    pub async fn connect_with_tls(
        config: &tokio_postgres::Config,
        tls: &TlsOptions,
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
            let attempt = Self::connect_host(config, tls, host, port);
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
                Ok(client) => return Ok(client),
                // Only a failure to reach the host moves on to the next one;
                // a rejected password would be rejected everywhere.
                Err(e) if e.is_transient() => last_err = Some(e),
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
        let backend_pid = startup(&mut conn, config).await?;
        Ok(ReplicationClient { conn, backend_pid })
    }

    /// The server process id of this connection's walsender (`pid` in
    /// `pg_stat_replication` and `active_pid` in `pg_replication_slots`).
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        const CMD: &str = "IDENTIFY_SYSTEM";
        let rows = self.simple_query(CMD).await?;
        let row = single_row(CMD, rows)?;
        Ok(SystemIdentity {
            system_id: parse_col(CMD, "systemid", &row, 0, |s| s.parse().ok())?,
            timeline: parse_col(CMD, "timeline", &row, 1, |s| s.parse().ok())?,
            xlogpos: parse_col(CMD, "xlogpos", &row, 2, |s| s.parse().ok())?,
            dbname: row.get(3).cloned().flatten(),
        })
    }

    /// `CREATE_REPLICATION_SLOT "name" [TEMPORARY] LOGICAL pgoutput (SNAPSHOT 'export')`
    /// (Postgres 15+ syntax).
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
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput (SNAPSHOT 'export')",
            quote_identifier(name),
            if temporary { " TEMPORARY" } else { "" },
        );
        let rows = self.simple_query(&sql).await?;
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
            quote_identifier(name),
            if wait { " WAIT" } else { "" }
        );
        self.simple_query(&sql).await.map(drop)
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

    /// `START_REPLICATION SLOT "slot" LOGICAL X/Y ("option" 'value', …)`, then
    /// CopyBoth streaming.
    ///
    /// Option names are quoted as identifiers and values as literals, so pass
    /// them unquoted, e.g. `[("proto_version", "1"), ("publication_names",
    /// &publication_names(["pub"]))]`. `start` is where decoding may begin; the
    /// server starts from the later of it and the slot's `confirmed_flush_lsn`
    /// (use `Lsn(0)` to resume exactly from the slot).
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, ReplicationError> {
        let mut sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start}",
            quote_identifier(slot)
        );
        if !options.is_empty() {
            let list: Vec<String> = options
                .iter()
                .map(|(name, value)| format!("{} {}", quote_identifier(name), quote_literal(value)))
                .collect();
            sql.push_str(" (");
            sql.push_str(&list.join(", "));
            sql.push(')');
        }
        frontend::query(&sql, &mut self.conn.write_buf)
            .map_err(|_| ReplicationError::Config("START_REPLICATION contains a NUL byte"))?;
        self.conn.flush().await?;
        loop {
            match self.conn.read_backend().await? {
                Backend::CopyBothResponse => return Ok(ReplicationStream::new(self)),
                Backend::Message(Message::ErrorResponse(body)) => {
                    let e = server_error(&body);
                    // Best effort: the caller gets the server's error either way.
                    let _ = self.conn.drain_to_ready().await;
                    return Err(ReplicationError::Server(e));
                }
                Backend::Message(Message::NoticeResponse(_) | Message::ParameterStatus(_)) => {}
                Backend::Message(other) => {
                    return Err(unexpected(&other, "starting replication"));
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn for_test(io: Box<dyn AsyncIo>) -> Self {
        ReplicationClient {
            conn: Connection::new(io),
            backend_pid: 0,
        }
    }

    /// Sends `Terminate` and closes the socket. Dropping the client also
    /// closes it, without the courtesy message.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        frontend::terminate(&mut self.conn.write_buf);
        self.conn.flush().await?;
        self.conn.io.shutdown().await?;
        Ok(())
    }
}

/// Formats publication names as the value of the `publication_names`
/// option: a comma-separated list of double-quoted identifiers.
pub fn publication_names<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names
        .into_iter()
        .map(quote_identifier)
        .collect::<Vec<_>>()
        .join(",")
}

/// Double-quotes an identifier for the replication command grammar
/// (`"` doubled inside).
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
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

async fn negotiate_tls(
    mut tcp: TcpStream,
    host: &str,
    options: &TlsOptions,
) -> Result<Box<dyn AsyncIo>, ReplicationError> {
    if options.mode == SslMode::Disable {
        return Ok(Box::new(tcp));
    }
    let tls_err = |reason| ReplicationError::Tls {
        host: host.to_owned(),
        reason,
    };
    let config = tls::client_config(options).map_err(tls_err)?;
    let name = tls::server_name(host).map_err(tls_err)?;
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await?;
    // Exactly one byte: anything after it must come through TLS.
    let answer = tcp.read_u8().await?;
    match answer {
        b'S' => {
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| tls_err(TlsError::Io(e)))?;
            Ok(Box::new(stream))
        }
        b'N' if options.mode == SslMode::Prefer => Ok(Box::new(tcp)),
        b'N' => Err(tls_err(TlsError::NotSupported)),
        other => Err(ProtocolError::Unexpected {
            tag: char::from(other),
            state: "negotiating TLS",
        }
        .into()),
    }
}

/// Startup message, authentication, and the wait for `ReadyForQuery`.
/// Returns the backend pid.
async fn startup(
    conn: &mut Connection,
    config: &tokio_postgres::Config,
) -> Result<i32, ReplicationError> {
    let user = config
        .get_user()
        .ok_or(ReplicationError::Config("no user configured"))?;
    let mut params = vec![
        ("user", user),
        ("database", config.get_dbname().unwrap_or(user)),
        ("replication", "database"),
        ("client_encoding", "UTF8"),
        (
            "application_name",
            config.get_application_name().unwrap_or("sluice"),
        ),
    ];
    if let Some(options) = config.get_options() {
        params.push(("options", options));
    }
    frontend::startup_message(params.iter().copied(), &mut conn.write_buf)
        .map_err(|_| ReplicationError::Config("connection parameter contains a NUL byte"))?;
    conn.flush().await?;

    let auth_err = |reason| ReplicationError::Auth {
        user: user.to_owned(),
        reason,
    };
    let password = || {
        config
            .get_password()
            .ok_or(auth_err(AuthError::PasswordRequired))
    };
    let mut scram: Option<sasl::ScramSha256> = None;
    loop {
        match conn.read_message("authenticating").await? {
            Message::AuthenticationOk => break,
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(password()?, &mut conn.write_buf)?;
                conn.flush().await?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(user.as_bytes(), password()?, body.salt());
                frontend::password_message(hash.as_bytes(), &mut conn.write_buf)?;
                conn.flush().await?;
            }
            Message::AuthenticationSasl(body) => {
                let mut has_scram = false;
                let mut mechanisms = body.mechanisms();
                while let Some(mechanism) = mechanisms.next().map_err(ProtocolError::Malformed)? {
                    has_scram |= mechanism == sasl::SCRAM_SHA_256;
                }
                if !has_scram {
                    return Err(auth_err(AuthError::NoSaslMechanism));
                }
                // "n": we do not do channel binding (SCRAM-SHA-256-PLUS is
                // only offered over TLS, and plain SCRAM is accepted there).
                let exchange =
                    sasl::ScramSha256::new(password()?, sasl::ChannelBinding::unsupported());
                frontend::sasl_initial_response(
                    sasl::SCRAM_SHA_256,
                    exchange.message(),
                    &mut conn.write_buf,
                )?;
                conn.flush().await?;
                scram = Some(exchange);
            }
            Message::AuthenticationSaslContinue(body) => {
                let exchange = scram.as_mut().ok_or(ProtocolError::Unexpected {
                    tag: 'R',
                    state: "authenticating (SASL continue without start)",
                })?;
                exchange
                    .update(body.data())
                    .map_err(|e| auth_err(AuthError::Scram(e)))?;
                frontend::sasl_response(exchange.message(), &mut conn.write_buf)?;
                conn.flush().await?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let exchange = scram.as_mut().ok_or(ProtocolError::Unexpected {
                    tag: 'R',
                    state: "authenticating (SASL final without start)",
                })?;
                exchange
                    .finish(body.data())
                    .map_err(|e| auth_err(AuthError::Scram(e)))?;
            }
            Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => {
                return Err(auth_err(AuthError::UnsupportedMethod("GSSAPI")));
            }
            Message::AuthenticationSspi => {
                return Err(auth_err(AuthError::UnsupportedMethod("SSPI")));
            }
            Message::AuthenticationKerberosV5 => {
                return Err(auth_err(AuthError::UnsupportedMethod("Kerberos V5")));
            }
            Message::AuthenticationScmCredential => {
                return Err(auth_err(AuthError::UnsupportedMethod("SCM credential")));
            }
            Message::ErrorResponse(body) => {
                let e = server_error(&body);
                return Err(if e.code.starts_with("28") {
                    auth_err(AuthError::Rejected(e))
                } else {
                    ReplicationError::Server(e)
                });
            }
            other => return Err(unexpected(&other, "authenticating")),
        }
    }

    let mut backend_pid = 0;
    loop {
        match conn.read_message("starting up").await? {
            Message::BackendKeyData(body) => backend_pid = body.process_id(),
            Message::ReadyForQuery(_) => return Ok(backend_pid),
            Message::ErrorResponse(body) => {
                return Err(ReplicationError::Server(server_error(&body)));
            }
            other => return Err(unexpected(&other, "starting up")),
        }
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
        assert_eq!(quote_identifier("slot"), "\"slot\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("1"), "'1'");
        assert_eq!(quote_literal("it's \\ ok"), "'it''s \\ ok'");
        assert_eq!(publication_names(["p1", "we\"ird"]), "\"p1\",\"we\"\"ird\"");
    }

    #[test]
    fn frames_copy_both_response_and_partial_messages() {
        // CopyBothResponse: 'W', len 7, format 0, 0 columns; then half a ReadyForQuery.
        let mut buf = BytesMut::from(&b"W\0\0\0\x07\0\0\0Z\0\0"[..]);
        assert!(matches!(
            parse_frame(&mut buf),
            Ok(Some(Backend::CopyBothResponse))
        ));
        assert!(matches!(parse_frame(&mut buf), Ok(None)));
        assert_eq!(&buf[..], b"Z\0\0");
        buf.extend_from_slice(b"\0\x05I");
        assert!(matches!(
            parse_frame(&mut buf),
            Ok(Some(Backend::Message(Message::ReadyForQuery(_))))
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut buf = BytesMut::from(&b"Z\0\0\0\x02"[..]);
        assert!(parse_frame(&mut buf).is_err());
    }
}
