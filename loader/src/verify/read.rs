//! Reading both sides for `verify`: the Postgres session (UTC, ISO dates,
//! round-trip floats, ISO 8601 intervals, hex bytea, so values print
//! canonically) and ClickHouse query results as TabSeparated text.

use sluice_broker::config::Config;
use sluice_postgres::{PgSettings, SqlConn};

use super::VerifyError;

/// A Postgres session through the connector the replicator uses, so `verify`
/// honours `sslmode`, `ssl_root_cert` and the client certificate like it.
pub(super) async fn connect_postgres(config: &Config) -> Result<SqlConn, VerifyError> {
    let mut settings = PgSettings::from_config(&config.postgres).map_err(VerifyError::Connect)?;
    settings.config.application_name("sluice-verify");
    let conn = settings
        .connect("verify")
        .await
        .map_err(VerifyError::Connect)?;
    conn.client
        .batch_execute(
            "SET timezone = 'UTC'; SET datestyle = 'ISO'; SET extra_float_digits = 3; \
             SET intervalstyle = 'iso_8601'; SET bytea_output = 'hex'",
        )
        .await
        .map_err(|source| VerifyError::Postgres {
            context: "setting session parameters".into(),
            source,
        })?;
    Ok(conn)
}

pub(super) fn clickhouse_client(config: &Config) -> Result<clickhouse::Client, VerifyError> {
    crate::clickhouse::client(&config.clickhouse).map_err(VerifyError::Client)
}

pub(super) async fn clickhouse_rows(
    ch: &clickhouse::Client,
    sql: &str,
    context: &str,
) -> Result<Vec<Vec<Option<String>>>, VerifyError> {
    let bytes = ch
        .query_raw(sql)
        .fetch_bytes("TabSeparated")
        .map_err(|source| VerifyError::ClickHouse {
            context: context.to_owned(),
            source,
        })?
        .collect()
        .await
        .map_err(|source| VerifyError::ClickHouse {
            context: context.to_owned(),
            source,
        })?;
    parse_tsv(&bytes).ok_or_else(|| VerifyError::Malformed {
        context: context.to_owned(),
    })
}

/// The values of a simple-query row as text (`None` = NULL).
pub(super) fn text_row(row: &tokio_postgres::SimpleQueryRow) -> Vec<Option<String>> {
    (0..row.len())
        .map(|i| row.get(i).map(str::to_owned))
        .collect()
}

/// Splits TabSeparated output into rows of unescaped fields (`\N` is NULL).
fn parse_tsv(bytes: &[u8]) -> Option<Vec<Vec<Option<String>>>> {
    bytes
        .split_inclusive(|&b| b == b'\n')
        .map(parse_tsv_line)
        .collect()
}

/// One line of TabSeparated output (with or without its `\n`) as unescaped
/// fields (`\N` is NULL); `None` if it is not UTF-8 or ends in a lone `\`.
pub(super) fn parse_tsv_line(line: &[u8]) -> Option<Vec<Option<String>>> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = std::str::from_utf8(line).ok()?;
    let mut fields = Vec::new();
    for field in line.split('\t') {
        if field == "\\N" {
            fields.push(None);
            continue;
        }
        let mut out = String::with_capacity(field.len());
        let mut chars = field.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next()? {
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'r' => out.push('\r'),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                '0' => out.push('\0'),
                'a' => out.push('\u{7}'),
                'v' => out.push('\u{b}'),
                other => out.push(other),
            }
        }
        fields.push(Some(out));
    }
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn tsv_unescapes() {
        let rows = parse_tsv(b"a\\tb\t\\N\tx\\\\y\n1\t2\t3\n").unwrap_or_default();
        assert_eq!(
            rows[0],
            vec![Some("a\tb".into()), None, Some("x\\y".into())]
        );
        assert_eq!(rows.len(), 2);
    }
}
