//! Errors of the ClickHouse layer, with the facts the loader decides on: the
//! variant, the `clickhouse` crate's error kind, and the code of a failed
//! response ([`Error::response_code`]). What the loader does about each
//! (retry, resync the table, ...) is decided in [`crate::recovery`] only.

/// A value that cannot be written into its ClickHouse column.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    #[error("value kind {value} does not fit ClickHouse type {ch_type}")]
    KindMismatch {
        value: &'static str,
        ch_type: String,
    },
    #[error("integer {0} out of range for the column")]
    IntOutOfRange(i64),
    #[error("numeric text {0:?} is not a decimal number")]
    BadNumeric(String),
    #[error("numeric text {0:?} does not fit the column's precision")]
    DecimalOverflow(String),
    #[error("NULL in a non-nullable column")]
    UnexpectedNull,
    #[error("uuid of {0} bytes (want 16)")]
    BadUuid(usize),
    #[error("array of {value} dimensions in a column of {column}")]
    ArrayDimensions { value: usize, column: usize },
    #[error("array dims {0:?} do not match its {1} elements")]
    ArrayShape(Vec<u32>, usize),
    #[error("unchanged TOAST value but no current row in ClickHouse to fill it from")]
    ToastMissing,
    #[error("unchanged TOAST value in a key column")]
    ToastInKey,
}

/// Why a ClickHouse operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request failed (connection, timeout, or a server error).
    #[error("clickhouse request failed: {what}")]
    ClickHouse {
        what: &'static str,
        #[source]
        source: clickhouse::error::Error,
    },
    /// A row value could not be encoded.
    #[error("column {column:?} of row {row}: {source}")]
    Value {
        column: String,
        row: usize,
        #[source]
        source: ValueError,
    },
    /// A row does not have one value per column of the relation.
    #[error("row {row} has {values} values, the relation has {columns} columns")]
    RowShape {
        row: usize,
        values: usize,
        columns: usize,
    },
    /// ClickHouse answered with something this layer cannot parse.
    #[error("unexpected response from clickhouse: {0}")]
    Response(String),
    /// A package whose rows were read once (to encode them ahead) could not
    /// be decoded again when its INSERT needed them as values.
    #[error("package rows could not be decoded again")]
    Decode(#[source] sluice_proto::DecodeError),
    /// A table without key columns cannot be ordered or deduplicated.
    #[error("table {0} has no key columns (replica identity)")]
    NoKey(String),
    /// The target table of a table the loader already applied packages of
    /// did not exist (dropped, or its name changed with an upgrade: README
    /// "Upgrading"): it was created empty, and only a resync refills it.
    #[error(
        "clickhouse table {target} of {table} did not exist although packages of {table} were applied before; it needs a resync"
    )]
    TargetMissing { table: String, target: String },
    /// The relation changed in a way ClickHouse cannot follow in place (a
    /// type narrowed or changed kind, the key changed, a column renamed):
    /// the table is rebuilt by a resync, before any row is encoded against
    /// the old table.
    #[error("schema change of {table} that ClickHouse cannot follow in place: {detail}")]
    SchemaChange { table: String, detail: String },
}

impl Error {
    /// The rows at hand are fine and the resync that rebuilds the table
    /// carries them (its snapshot is taken later): block the table and ask
    /// for the resync, but keep no dead letters.
    pub fn rows_come_with_the_resync(&self) -> bool {
        matches!(
            self,
            Error::SchemaChange { .. } | Error::TargetMissing { .. }
        )
    }

    /// The reason a resync this error asks for is requested with
    /// (`sluice_resyncs_total{reason}`).
    pub fn resync_reason(&self) -> &'static str {
        match self {
            Error::SchemaChange { .. } => "schema_change",
            Error::TargetMissing { .. } => "target_missing",
            _ => "refused",
        }
    }

    pub(crate) fn ch(what: &'static str) -> impl FnOnce(clickhouse::error::Error) -> Error {
        move |source| Error::ClickHouse { what, source }
    }

    /// The code of a failed response: the ClickHouse exception code when
    /// the server sent one, else the HTTP status the text starts with.
    /// `clickhouse` 0.15 keeps both only as text (`BadResponse`): this is
    /// the one place that reads the text.
    pub fn response_code(&self) -> Option<ResponseCode> {
        match self {
            Error::ClickHouse {
                source: clickhouse::error::Error::BadResponse(text),
                ..
            } => ResponseCode::parse(text),
            _ => None,
        }
    }
}

/// The code of a failed ClickHouse response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseCode {
    /// A ClickHouse exception code (`Code: 241. DB::Exception: …`, or the
    /// `X-ClickHouse-Exception-Code` header).
    Server(u32),
    /// An HTTP status without an exception code (`503 Service
    /// Unavailable`): a proxy, or a server that failed before running the
    /// query.
    Http(u16),
}

impl ResponseCode {
    /// Reads `Code: N` anywhere in `text`, else an HTTP status (three
    /// digits) at its start.
    fn parse(text: &str) -> Option<ResponseCode> {
        if let Some(at) = text.find("Code: ") {
            let rest = &text[at + 6..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            return rest[..end].parse().ok().map(ResponseCode::Server);
        }
        let status = text.get(..3)?;
        let after = text[3..].chars().next();
        if status.bytes().all(|b| b.is_ascii_digit()) && after.is_none_or(|c| !c.is_ascii_digit()) {
            return status.parse().ok().map(ResponseCode::Http);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(text: &str) -> Error {
        Error::ClickHouse {
            what: "insert",
            source: clickhouse::error::Error::BadResponse(text.into()),
        }
    }

    #[test]
    fn response_codes_are_parsed_once_from_the_text() {
        assert_eq!(
            bad("Code: 60. DB::Exception: Unknown table").response_code(),
            Some(ResponseCode::Server(60))
        );
        // The client's form of the `X-ClickHouse-Exception-Code` header.
        assert_eq!(
            bad("Code: 252").response_code(),
            Some(ResponseCode::Server(252))
        );
        assert_eq!(
            bad("503 Service Unavailable").response_code(),
            Some(ResponseCode::Http(503))
        );
        assert_eq!(bad("404").response_code(), Some(ResponseCode::Http(404)));
        assert_eq!(bad("<html>bad gateway</html>").response_code(), None);
        assert_eq!(bad("4000 things").response_code(), None);
        let e = Error::Value {
            column: "c".into(),
            row: 0,
            source: ValueError::UnexpectedNull,
        };
        assert_eq!(e.response_code(), None);
    }
}
