//! A plain SQL session on the hand-written wire, for a snapshot reader's
//! `COPY … TO STDOUT`.
//!
//! `COPY` sends one message per row. `tokio-postgres` turns each into a
//! message object and hands it through its connection's channel: about a
//! third of the replicator's CPU during a snapshot. [`CopyOut::rows`] hands
//! each row's bytes straight from the read buffer instead. The session opens
//! like the replication connection (same hosts, TLS and authentication),
//! without `replication=database`: an ordinary backend, not a walsender.

use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::conn::ReplicationClient;
use super::error::ReplicationError;
use super::startup::Session;
use super::wire::{Connection, CopyOutStep, server_error, unexpected};
use sluice_postgres::tls::TlsOptions;

/// An ordinary SQL session: simple-query statements and `COPY … TO STDOUT`.
pub struct SqlSession {
    client: ReplicationClient,
}

impl std::fmt::Debug for SqlSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlSession")
            .field("backend_pid", &self.client.backend_pid())
            .finish_non_exhaustive()
    }
}

impl SqlSession {
    /// Connects to the first of `config`'s hosts that answers, with `tls`
    /// (see [`ReplicationClient::connect_with_tls`]).
    pub async fn connect(
        config: &tokio_postgres::Config,
        tls: &TlsOptions,
    ) -> Result<Self, ReplicationError> {
        Ok(SqlSession {
            client: ReplicationClient::open(config, tls, Session::Sql).await?,
        })
    }

    /// The server process id of this session.
    pub fn backend_pid(&self) -> i32 {
        self.client.backend_pid()
    }

    /// Runs `sql` (one statement or several, separated by `;`) with the
    /// simple-query protocol and returns the text values of every row,
    /// `None` for NULL. A statement that starts a COPY is a protocol error
    /// here: use [`SqlSession::copy_out`].
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        self.client.simple_query(sql).await
    }

    /// Starts `sql`, a `COPY … TO STDOUT`, and returns its rows' reader.
    /// Read it to its end before the next statement: a session whose COPY
    /// was left half-read is of no further use.
    pub async fn copy_out(&mut self, sql: &str) -> Result<CopyOut<'_>, ReplicationError> {
        let conn = &mut self.client.conn;
        frontend::query(sql, &mut conn.write_buf)
            .map_err(|_| ReplicationError::Config("query contains a NUL byte"))?;
        conn.flush().await?;
        match conn.read_message("starting a COPY").await? {
            Message::CopyOutResponse(_) => Ok(CopyOut { conn, ended: false }),
            Message::ErrorResponse(body) => {
                let error = server_error(&body);
                conn.drain_to_ready().await?;
                Err(ReplicationError::Server(error))
            }
            other => Err(unexpected(&other, "starting a COPY")),
        }
    }

    /// Sends `Terminate` and closes the socket.
    pub async fn close(self) -> Result<(), ReplicationError> {
        self.client.close().await
    }
}

/// The rows of a `COPY … TO STDOUT` in progress ([`SqlSession::copy_out`]).
pub struct CopyOut<'a> {
    conn: &'a mut Connection,
    ended: bool,
}

impl CopyOut<'_> {
    /// Hands the data of each row message already received to `take`, in
    /// order, until `take` returns `false` (the message it was handed is
    /// consumed) or none is left; waits for the socket only when none had
    /// arrived. Returns `false` once the COPY has ended (every row was
    /// handed over and the session is ready for its next statement), or the
    /// server's error if the COPY failed.
    pub async fn rows(
        &mut self,
        take: impl FnMut(&[u8]) -> bool,
    ) -> Result<bool, ReplicationError> {
        if self.ended {
            return Ok(false);
        }
        match self.conn.copy_out_data(take).await? {
            CopyOutStep::More => Ok(true),
            CopyOutStep::Ended => {
                self.ended = true;
                Ok(false)
            }
        }
    }
}
