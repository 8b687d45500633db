//! Errors of the ClickHouse layer, typed by what the loader does next:
//! [`Error::is_transient`] errors are retried with backoff (the batch stays
//! unacked); all others are definite: retrying the same bytes cannot succeed,
//! so the loader dead-letters the package or resyncs the table.

/// ClickHouse server error codes that mean "try again later" (overload,
/// timeouts, replicas or Keeper temporarily unavailable, an insert whose
/// outcome is unknown — safe to repeat because inserts are idempotent).
const TRANSIENT_CODES: &[u32] = &[
    3,   // UNEXPECTED_END_OF_FILE (connection cut mid-request)
    159, // TIMEOUT_EXCEEDED
    164, // READONLY (replica in read-only mode, e.g. Keeper session lost)
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    236, // ABORTED
    241, // MEMORY_LIMIT_EXCEEDED
    242, // TABLE_IS_READ_ONLY
    252, // TOO_MANY_PARTS
    285, // TOO_FEW_LIVE_REPLICAS
    319, // UNKNOWN_STATUS_OF_INSERT
    394, // QUERY_WAS_CANCELLED
    425, // SYSTEM_ERROR
    439, // CANNOT_SCHEDULE_TASK
    473, // DEADLOCK_AVOIDED
    999, // KEEPER_EXCEPTION
];

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
}

impl Error {
    pub(crate) fn ch(what: &'static str) -> impl FnOnce(clickhouse::error::Error) -> Error {
        move |source| Error::ClickHouse { what, source }
    }

    /// The ClickHouse server error code, when the server sent one.
    pub fn server_code(&self) -> Option<u32> {
        match self {
            Error::ClickHouse {
                source: clickhouse::error::Error::BadResponse(text),
                ..
            } => parse_code(text),
            _ => None,
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        use clickhouse::error::Error as E;
        match self {
            Error::ClickHouse { source, .. } => match source {
                E::Network(_) | E::TimedOut | E::Other(_) => true,
                E::BadResponse(text) => match parse_code(text) {
                    Some(code) => TRANSIENT_CODES.contains(&code),
                    // No exception code: an HTTP-level failure (proxy, 5xx).
                    None => !text.starts_with('4'),
                },
                _ => false,
            },
            _ => false,
        }
    }
}

/// Extracts `N` from `Code: N. DB::Exception: …` (or the bare `Code: N` the
/// client makes from the `X-ClickHouse-Exception-Code` header).
fn parse_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
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
    fn classification() {
        assert!(bad("Code: 202. DB::Exception: Too many simultaneous queries").is_transient());
        assert!(bad("Code: 252").is_transient());
        assert!(!bad("Code: 27. DB::Exception: Cannot parse input").is_transient());
        assert_eq!(
            bad("Code: 60. DB::Exception: Unknown table").server_code(),
            Some(60)
        );
        assert!(bad("503 Service Unavailable").is_transient());
        assert!(!bad("400 Bad Request").is_transient());
        let e = Error::Value {
            column: "c".into(),
            row: 0,
            source: ValueError::UnexpectedNull,
        };
        assert!(!e.is_transient());
    }
}
