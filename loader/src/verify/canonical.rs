//! How `verify` reads and canonicalises each column on both sides: the
//! column's [`ColumnKind`] (from its ClickHouse type), the select expression
//! per side (the Postgres side applying the loader's documented clamps, with
//! the encoder's clamp bounds), and the canonical text of a value, so equal
//! data compares equal (see the module docs of `verify`).

use crate::clickhouse::encode::{
    DATE32_MAX_DAYS, DATE32_MIN_DAYS, DATETIME64_MAX_US, DATETIME64_MIN_US,
};
use crate::clickhouse::schema::quote_ident;
use sluice_broker::table::quote_ident as pg_quote_ident;
use sluice_postgres::version::has_numeric_infinity;

/// How a column's values are read and canonicalised on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ColumnKind {
    Plain,
    /// Postgres prints `t`/`f`, ClickHouse `true`/`false`.
    Bool,
    Float32,
    Float64,
    Decimal {
        precision: u32,
        scale: u32,
        money: bool,
    },
    Date,
    Timestamp {
        utc: bool,
    },
    Time,
    Bytea,
    Array {
        depth: usize,
    },
}

#[derive(Debug, Clone)]
pub(super) struct Column {
    /// The Postgres name.
    pub(super) name: String,
    /// The ClickHouse name ([`crate::clickhouse::names::target_column_name`]).
    pub(super) ch_name: String,
    pub(super) kind: ColumnKind,
    pub(super) key: bool,
    /// Absent from the ClickHouse table.
    pub(super) missing: bool,
    /// The Postgres type (a domain's base type), e.g. `int8`.
    pub(super) pg_type: String,
}

/// Postgres types whose `::text` cast is their output function and whose
/// text never holds a `\x1f` nor is `\N`.
const PLAIN_TOKENS: [&str; 5] = ["int2", "int4", "int8", "oid", "uuid"];

impl Column {
    /// A [`ColumnKind::Plain`] column whose text is a token: digits, signs,
    /// hex and dashes.
    pub(super) fn is_token(&self) -> bool {
        self.kind == ColumnKind::Plain && PLAIN_TOKENS.contains(&self.pg_type.as_str())
    }

    /// The Postgres output text of `e`, an expression of this column's
    /// type: a `::text` cast where that is the same and cheaper, else
    /// `format('%s', …)` (a `::text` cast would drop `char(n)`'s padding,
    /// print a `bool` as `true` and an `inet` with its netmask).
    pub(super) fn pg_output(&self, e: &str) -> String {
        if self.is_token() || matches!(self.pg_type.as_str(), "text" | "varchar") {
            format!("({e})::text")
        } else {
            format!("format('%s', {e})")
        }
    }
}

pub(super) fn classify(ch_type: &str, pg_base_type: &str) -> ColumnKind {
    let mut t = ch_type;
    for wrapper in ["LowCardinality(", "Nullable("] {
        if let Some(inner) = t.strip_prefix(wrapper).and_then(|s| s.strip_suffix(')')) {
            t = inner;
        }
    }
    if t.starts_with("Array(") {
        let mut depth = 0;
        let mut rest = t;
        while let Some(inner) = rest.strip_prefix("Array(") {
            depth += 1;
            rest = inner;
        }
        return ColumnKind::Array { depth };
    }
    if pg_base_type == "bytea" {
        return ColumnKind::Bytea;
    }
    if let Some(args) = t.strip_prefix("Decimal(").and_then(|s| s.strip_suffix(')'))
        && let Some((p, s)) = args.split_once(',')
        && let (Ok(precision), Ok(scale)) = (p.trim().parse(), s.trim().parse())
    {
        return ColumnKind::Decimal {
            precision,
            scale,
            money: pg_base_type == "money",
        };
    }
    match t {
        "Bool" => ColumnKind::Bool,
        "Float32" => ColumnKind::Float32,
        "Float64" => ColumnKind::Float64,
        "Date32" => ColumnKind::Date,
        "DateTime64(6)" => ColumnKind::Timestamp { utc: false },
        "DateTime64(6, 'UTC')" => ColumnKind::Timestamp { utc: true },
        "Time64(6)" => ColumnKind::Time,
        _ => ColumnKind::Plain,
    }
}

/// The largest value of `Decimal(precision, scale)` as text.
fn decimal_max(precision: u32, scale: u32) -> String {
    let int_digits = precision.saturating_sub(scale) as usize;
    let int = if int_digits == 0 {
        "0".to_owned()
    } else {
        "9".repeat(int_digits)
    };
    if scale == 0 {
        int
    } else {
        format!("{int}.{}", "9".repeat(scale as usize))
    }
}

/// The Postgres select expression of a column, applying the loader's clamps,
/// for a server of `server_version_num` (whose `numeric` may lack `±Infinity`).
pub(super) fn pg_expr(column: &Column, server_version_num: i32) -> String {
    let q = pg_quote_ident(&column.name);
    let clamp = |low: &str, high: &str, ty: &str| {
        format!(
            "CASE WHEN {q} IS NULL THEN NULL ELSE greatest(least({q}, '{high}'::{ty}), '{low}'::{ty}) END"
        )
    };
    match &column.kind {
        ColumnKind::Plain
        | ColumnKind::Bool
        | ColumnKind::Float32
        | ColumnKind::Float64
        | ColumnKind::Time => q,
        ColumnKind::Decimal { money: true, .. } => format!("{q}::numeric"),
        ColumnKind::Decimal {
            precision, scale, ..
        } => {
            let max = decimal_max(*precision, *scale);
            // Postgres 13 has no numeric infinity and refuses the literal.
            let infinities = if has_numeric_infinity(server_version_num) {
                format!(
                    "WHEN {q} = 'Infinity'::numeric THEN {max}::numeric \
                     WHEN {q} = '-Infinity'::numeric THEN -{max}::numeric "
                )
            } else {
                String::new()
            };
            format!("CASE WHEN {q} = 'NaN'::numeric THEN 0::numeric {infinities}ELSE {q} END")
        }
        ColumnKind::Date => clamp(
            &date_literal(DATE32_MIN_DAYS),
            &date_literal(DATE32_MAX_DAYS),
            "date",
        ),
        ColumnKind::Timestamp { utc } => {
            let ty = if *utc { "timestamptz" } else { "timestamp" };
            let zone = if *utc { "+00" } else { "" };
            let low = format!("{}{zone}", timestamp_literal(DATETIME64_MIN_US));
            let high = format!("{}{zone}", timestamp_literal(DATETIME64_MAX_US));
            format!(
                "to_char({}, 'YYYY-MM-DD HH24:MI:SS.US')",
                clamp(&low, &high, ty)
            )
        }
        ColumnKind::Bytea => format!("encode({q}, 'hex')"),
        ColumnKind::Array { .. } => format!("to_jsonb({q})::text"),
    }
}

/// `YYYY-MM-DD` of a day count since 1970-01-01 (proleptic Gregorian, as
/// Postgres and ClickHouse count).
fn date_literal(days: i32) -> String {
    // Howard Hinnant's civil_from_days.
    let z = i64::from(days) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// `YYYY-MM-DD HH:MM:SS.ffffff` of microseconds since 1970-01-01 00:00:00.
fn timestamp_literal(us: i64) -> String {
    const DAY_US: i64 = 86_400_000_000;
    let days = us.div_euclid(DAY_US);
    let of_day = us.rem_euclid(DAY_US);
    let (seconds, micros) = (of_day / 1_000_000, of_day % 1_000_000);
    format!(
        "{} {:02}:{:02}:{:02}.{micros:06}",
        date_literal(i32::try_from(days).unwrap_or(if days < 0 { i32::MIN } else { i32::MAX })),
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// The ClickHouse select expression of a column.
pub(super) fn ch_expr(column: &Column) -> String {
    if column.missing {
        return "NULL".into();
    }
    let q = quote_ident(&column.ch_name);
    match column.kind {
        ColumnKind::Bytea => format!("lower(hex({q}))"),
        ColumnKind::Array { .. } => format!("toJSONString({q})"),
        _ => q,
    }
}

/// Canonical text of a value read from either side.
pub(super) fn canonical(
    kind: &ColumnKind,
    value: Option<&str>,
    from_postgres: bool,
) -> Option<String> {
    if let ColumnKind::Array { depth } = kind {
        return Some(canonical_array(value, *depth, from_postgres));
    }
    let value = value?;
    Some(match kind {
        ColumnKind::Float32 => match value.parse::<f32>() {
            Ok(v) => canonical_float(f64::from(v), v.to_string()),
            Err(_) => value.to_owned(),
        },
        ColumnKind::Float64 => match value.parse::<f64>() {
            Ok(v) => canonical_float(v, v.to_string()),
            Err(_) => value.to_owned(),
        },
        ColumnKind::Decimal { .. } => canonical_decimal(value),
        ColumnKind::Bool => match value {
            "t" | "true" | "1" => "true".into(),
            "f" | "false" | "0" => "false".into(),
            other => other.to_owned(),
        },
        ColumnKind::Time => pad_fraction(value),
        _ => value.to_owned(),
    })
}

fn canonical_float(v: f64, shortest: String) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if v == 0.0 {
        // -0 and 0 are equal as values.
        "0".into()
    } else {
        shortest
    }
}

/// `12.300` → `12.3`, `5.000` → `5`, `-0.00` → `0`.
fn canonical_decimal(value: &str) -> String {
    let mut s = value.to_owned();
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    if s == "-0" { "0".into() } else { s }
}

/// `13:45:00` → `13:45:00.000000`, `13:45:00.5` → `13:45:00.500000`.
fn pad_fraction(value: &str) -> String {
    match value.split_once('.') {
        Some((whole, frac)) => format!("{whole}.{frac:0<6}"),
        None => format!("{value}.000000"),
    }
}

/// An array as a JSON tree whose scalars are all strings, wrapped to the
/// column's depth; NULL and `{}` are both `[]`.
fn canonical_array(value: Option<&str>, depth: usize, from_postgres: bool) -> String {
    let Some(text) = value else {
        return "[]".into();
    };
    let Ok(mut json) = serde_json::from_str::<serde_json::Value>(text) else {
        return format!("unparsable: {text}");
    };
    if from_postgres {
        if json.as_array().is_some_and(Vec::is_empty) {
            return "[]".into();
        }
        let value_depth = json_depth(&json);
        for _ in value_depth..depth {
            json = serde_json::Value::Array(vec![json]);
        }
    }
    stringify_scalars(&json).to_string()
}

/// Depth of nested arrays along the first elements.
fn json_depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.first().map_or(0, json_depth),
        _ => 0,
    }
}

fn stringify_scalars(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Array(items) => Value::Array(items.iter().map(stringify_scalars).collect()),
        Value::Null => Value::Null,
        Value::String(s) => Value::String(s.clone()),
        Value::Number(n) => Value::String(match n.as_f64() {
            Some(f) if !n.is_i64() && !n.is_u64() => canonical_float(f, f.to_string()),
            _ => n.to_string(),
        }),
        other => Value::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn canonical_forms_meet() {
        let f64k = ColumnKind::Float64;
        for (pg, ch) in [
            ("NaN", "nan"),
            ("Infinity", "inf"),
            ("-Infinity", "-inf"),
            ("1e+20", "100000000000000000000"),
            ("0.1", "0.1"),
            ("-0", "0"),
        ] {
            assert_eq!(
                canonical(&f64k, Some(pg), true),
                canonical(&f64k, Some(ch), false),
                "{pg} vs {ch}"
            );
        }
        let bool_kind = classify("Nullable(Bool)", "bool");
        for (pg, ch) in [("t", "true"), ("f", "false")] {
            assert_eq!(
                canonical(&bool_kind, Some(pg), true),
                canonical(&bool_kind, Some(ch), false),
                "{pg} vs {ch}"
            );
        }
        assert_ne!(
            canonical(&bool_kind, Some("t"), true),
            canonical(&bool_kind, Some("false"), false)
        );
        assert_eq!(
            canonical(&ColumnKind::Float32, Some("0.1"), true),
            canonical(&ColumnKind::Float32, Some("0.1"), false)
        );
        let dec = ColumnKind::Decimal {
            precision: 12,
            scale: 3,
            money: false,
        };
        assert_eq!(
            canonical(&dec, Some("12.300"), true).as_deref(),
            Some("12.3")
        );
        assert_eq!(canonical(&dec, Some("5.000"), true).as_deref(), Some("5"));
        assert_eq!(canonical(&dec, Some("-0.000"), true).as_deref(), Some("0"));
        assert_eq!(canonical(&dec, Some("500"), true).as_deref(), Some("500"));
        assert_eq!(pad_fraction("24:00:00"), "24:00:00.000000");
        assert_eq!(pad_fraction("13:45:00.5"), "13:45:00.500000");
        assert_eq!(decimal_max(12, 3), "999999999.999");
        assert_eq!(decimal_max(3, 3), "0.999");
    }

    #[test]
    fn arrays_compare_as_trees() {
        let two = ColumnKind::Array { depth: 2 };
        assert_eq!(
            canonical(&two, Some("[[1, 2], [3, null]]"), true),
            canonical(&two, Some("[[1,2],[3,null]]"), false)
        );
        // A 1-D value in a 2-D column is wrapped; NULL and {} are empty.
        assert_eq!(
            canonical(&two, Some("[1, 2]"), true),
            canonical(&two, Some("[[1,2]]"), false)
        );
        assert_eq!(
            canonical(&two, None, true),
            canonical(&two, Some("[]"), false)
        );
        assert_eq!(
            canonical(&two, Some("[]"), true),
            canonical(&two, Some("[]"), false)
        );
        let one = ColumnKind::Array { depth: 1 };
        assert_eq!(
            canonical(&one, Some(r#"["a", "b\"c"]"#), true),
            canonical(&one, Some(r#"["a","b\"c"]"#), false)
        );
        assert_eq!(
            canonical(&one, Some(r#"[5]"#), true),
            canonical(&one, Some(r#"["5"]"#), false)
        );
    }

    #[test]
    fn classifies_clickhouse_types() {
        assert_eq!(
            classify("Nullable(Decimal(12, 3))", "numeric"),
            ColumnKind::Decimal {
                precision: 12,
                scale: 3,
                money: false
            }
        );
        assert_eq!(
            classify("Array(Array(Nullable(Int32)))", "_int4"),
            ColumnKind::Array { depth: 2 }
        );
        assert_eq!(classify("Nullable(String)", "bytea"), ColumnKind::Bytea);
        assert_eq!(
            classify("Nullable(DateTime64(6, 'UTC'))", "timestamptz"),
            ColumnKind::Timestamp { utc: true }
        );
        assert_eq!(
            classify("LowCardinality(Nullable(String))", "mood"),
            ColumnKind::Plain
        );
    }

    #[test]
    fn clamp_bounds_are_the_encoders() {
        assert_eq!(date_literal(0), "1970-01-01");
        assert_eq!(date_literal(DATE32_MIN_DAYS), "1900-01-01");
        assert_eq!(date_literal(DATE32_MAX_DAYS), "2299-12-31");
        assert_eq!(timestamp_literal(-1), "1969-12-31 23:59:59.999999");
        assert_eq!(
            timestamp_literal(DATETIME64_MIN_US),
            "1900-01-01 00:00:00.000000"
        );
        assert_eq!(
            timestamp_literal(DATETIME64_MAX_US),
            "2299-12-31 23:59:59.999999"
        );
        let column = |kind| Column {
            name: "c".into(),
            ch_name: "c".into(),
            kind,
            key: false,
            missing: false,
            pg_type: "date".into(),
        };
        assert_eq!(
            pg_expr(&column(ColumnKind::Date), 150000),
            "CASE WHEN \"c\" IS NULL THEN NULL ELSE greatest(least(\"c\", '2299-12-31'::date), \
             '1900-01-01'::date) END"
        );
        assert!(
            pg_expr(&column(ColumnKind::Timestamp { utc: true }), 150000)
                .contains("least(\"c\", '2299-12-31 23:59:59.999999+00'::timestamptz), '1900-01-01 00:00:00.000000+00'::timestamptz)")
        );
        // Numeric ±Infinity exists from Postgres 14 on; 13 refuses the literal.
        let decimal = column(ColumnKind::Decimal {
            precision: 4,
            scale: 1,
            money: false,
        });
        assert_eq!(
            pg_expr(&decimal, 140000),
            "CASE WHEN \"c\" = 'NaN'::numeric THEN 0::numeric \
             WHEN \"c\" = 'Infinity'::numeric THEN 999.9::numeric \
             WHEN \"c\" = '-Infinity'::numeric THEN -999.9::numeric ELSE \"c\" END"
        );
        assert_eq!(
            pg_expr(&decimal, 130023),
            "CASE WHEN \"c\" = 'NaN'::numeric THEN 0::numeric ELSE \"c\" END"
        );
    }
}
