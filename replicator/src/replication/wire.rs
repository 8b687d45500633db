//! Framing of the backend protocol on the replication socket: one
//! cancel-safe [`Connection`] with its read and write buffers, shared by the
//! command phase ([`super::ReplicationClient`]) and CopyBoth streaming
//! ([`super::ReplicationStream`]).

use std::io;

use bytes::{Buf, BytesMut};
use postgres_protocol::message::backend::{Header, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{ProtocolError, ReplicationError, ServerError};

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
    /// `server_version` as the server reported it (a `ParameterStatus` at
    /// startup), e.g. `13.23` or `15.18 (Debian 15.18-0+deb12u1)`: for error
    /// messages.
    pub(crate) server_version: Option<String>,
    /// The `ErrorResponse` of a COPY being read, until its `ReadyForQuery`.
    copy_error: Option<Box<ServerError>>,
}

/// Where a `COPY … TO STDOUT` stands after [`Connection::copy_out_data`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyOutStep {
    /// More rows may come.
    More,
    /// The COPY ended and the session is ready for the next query.
    Ended,
}

const READ_CHUNK: usize = 64 * 1024;

impl Connection {
    pub(crate) fn new(io: Box<dyn AsyncIo>) -> Self {
        Connection {
            io,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: BytesMut::with_capacity(1024),
            server_version: None,
            copy_error: None,
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
            self.fill().await?;
        }
    }

    /// Reads what the socket has into `read_buf`: the only `.await` of
    /// [`Connection::read_backend`] and [`Connection::copy_out_data`].
    async fn fill(&mut self) -> Result<(), ReplicationError> {
        if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 4 {
            self.read_buf.reserve(READ_CHUNK);
        }
        let n = self.io.read_buf(&mut self.read_buf).await?;
        if n == 0 {
            return Err(ReplicationError::Closed);
        }
        Ok(())
    }

    /// While a `COPY … TO STDOUT` runs: hands the data of each buffered
    /// `CopyData` message to `take`, in order, straight from the read buffer
    /// (no message object per row), until `take` returns `false` or no whole
    /// message is left; reads from the socket only when none was handed over.
    /// Returns [`CopyOutStep::Ended`] once the server is ready for the next
    /// query after the COPY, or the server's error if the COPY failed.
    /// Cancel-safe as [`Connection::read_backend`] is: a message leaves the
    /// buffer only once `take` has had it.
    pub(crate) async fn copy_out_data(
        &mut self,
        mut take: impl FnMut(&[u8]) -> bool,
    ) -> Result<CopyOutStep, ReplicationError> {
        let mut handed = false;
        loop {
            while let Some(total) = whole_frame(&mut self.read_buf)? {
                if self.read_buf[0] == b'd' {
                    let more = take(&self.read_buf[5..total]);
                    self.read_buf.advance(total);
                    handed = true;
                    if !more {
                        return Ok(CopyOutStep::More);
                    }
                    continue;
                }
                // Anything else is rare: parsed as a message. The frame is
                // whole, so this does not wait unless it was a notice.
                match self.read_message("reading COPY data").await? {
                    Message::CopyDone | Message::CommandComplete(_) => {}
                    Message::ErrorResponse(body) => self.copy_error = Some(server_error(&body)),
                    Message::ReadyForQuery(_) => {
                        return match self.copy_error.take() {
                            Some(error) => Err(ReplicationError::Server(error)),
                            None => Ok(CopyOutStep::Ended),
                        };
                    }
                    other => return Err(unexpected(&other, "reading COPY data")),
                }
            }
            if handed {
                return Ok(CopyOutStep::More);
            }
            self.fill().await?;
        }
    }

    /// Reads the next message that matters to the protocol state machine,
    /// logging notices and skipping parameter status reports (but keeping
    /// `server_version`).
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
                Backend::Message(Message::ParameterStatus(body)) => {
                    if body.name().ok() == Some("server_version") {
                        self.server_version = body.value().ok().map(str::to_owned);
                    }
                }
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

    /// Shuts the socket down (TLS close_notify, then TCP FIN).
    pub(crate) async fn shutdown(&mut self) -> Result<(), ReplicationError> {
        self.io.shutdown().await?;
        Ok(())
    }

    /// After an `ErrorResponse`, the server still sends `ReadyForQuery`; read
    /// up to it so the connection stays usable, then hand back the error.
    pub(crate) async fn drain_to_ready(&mut self) -> Result<(), ReplicationError> {
        loop {
            if let Message::ReadyForQuery(_) = self.read_message("draining after an error").await? {
                return Ok(());
            }
        }
    }
}

/// The length (tag included) of the whole message at the start of `buf`,
/// `None` while it is incomplete (room is reserved for the rest).
fn whole_frame(buf: &mut BytesMut) -> Result<Option<usize>, ProtocolError> {
    let Some(header) = Header::parse(buf).map_err(ProtocolError::Malformed)? else {
        return Ok(None);
    };
    // `Header::parse` checked len >= 4, so this is at least 5.
    let total = header.len() as usize + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    Ok(Some(total))
}

fn parse_frame(buf: &mut BytesMut) -> Result<Option<Backend>, ProtocolError> {
    let Some(total) = whole_frame(buf)? else {
        return Ok(None);
    };
    if buf[0] == b'W' {
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

pub(crate) fn server_error(
    body: &postgres_protocol::message::backend::ErrorResponseBody,
) -> Box<ServerError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
