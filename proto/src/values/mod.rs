//! Typed conversion of Postgres' text values (pgoutput's, and `COPY`'s once
//! unescaped, see [`copy`]) into wire values.
//!
//! pgoutput (protocol v1, no `binary` option) sends every column value as the
//! type's text output function would print it *in the walsender's session*.
//! The parsers here accept exactly the formats Postgres prints with these
//! settings, which the replication connection must set in its startup
//! `options` (a walsender otherwise uses the server's defaults):
//!
//! | GUC | value | why |
//! |---|---|---|
//! | `DateStyle` | `ISO` | `2024-01-02`, `2024-01-02 03:04:05+00` |
//! | `IntervalStyle` | `postgres` | `1 year 2 mons 3 days 04:05:06` |
//! | `TimeZone` | `UTC` (any zone parses) | timestamptz offsets |
//! | `extra_float_digits` | `1` or more (`3`) | floats round-trip exactly |
//! | `bytea_output` | `hex` (escape also parses) | |
//! | `lc_monetary` | `C` | money as `$1,234.56` / `-$1.00` |
//!
//! Values come from the database, so they are untrusted input for the purpose
//! of never panicking: every parser uses checked arithmetic and returns
//! [`ValueError`]. Errors never contain the value itself (logs must not carry
//! row data), only the type and what was wrong.

use crate::v1;
use crate::v1::value::Kind;

mod array;
pub mod copy;
mod types;

pub use types::{TypeCategory, TypeInfo, oid};

use array::decode_array;

/// A column value whose text could not be converted to its type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode value of type {type_name}: {reason}")]
pub struct ValueError {
    /// `pg_type.typname` of the column type.
    pub type_name: String,
    /// What was wrong (never the value itself).
    pub reason: &'static str,
}

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;

type Parsed<T> = Result<T, &'static str>;

/// A SQL NULL.
pub fn null() -> v1::Value {
    v1::Value {
        kind: Some(Kind::Null(v1::Null {})),
    }
}

/// An unchanged TOAST value (pgoutput's `u` column).
pub fn unchanged_toast() -> v1::Value {
    v1::Value {
        kind: Some(Kind::UnchangedToast(v1::UnchangedToast {})),
    }
}

/// Converts the text output of a non-NULL value of type `ty` into a typed value.
///
/// Arrays (and domains over arrays) decode into [`v1::Array`] with every
/// element decoded by `ty.category`.
pub fn decode_text(ty: &TypeInfo, text: &str) -> Result<v1::Value, ValueError> {
    let result = match ty.array_delimiter {
        Some(delimiter) => decode_array(ty.category, delimiter, text).map(Kind::Array),
        None => decode_scalar(ty.category, text),
    };
    result
        .map(|kind| v1::Value { kind: Some(kind) })
        .map_err(|reason| ValueError {
            type_name: ty.name.clone(),
            reason,
        })
}

/// Converts one scalar value's text according to its category.
pub fn decode_scalar(category: TypeCategory, text: &str) -> Result<Kind, &'static str> {
    Ok(match category {
        TypeCategory::Bool => Kind::Bool(parse_bool(text)?),
        TypeCategory::Int => Kind::Int(text.parse().map_err(|_| "not an integer in range")?),
        TypeCategory::Float => Kind::Float(parse_float(text)?),
        TypeCategory::Numeric => Kind::Numeric(parse_numeric(text)?.to_owned()),
        TypeCategory::Money => Kind::Numeric(parse_money(text)?),
        TypeCategory::Text => Kind::Text(text.to_owned()),
        TypeCategory::Json => Kind::Json(text.to_owned()),
        TypeCategory::Bytea => Kind::Bytes(parse_bytea(text)?),
        TypeCategory::Uuid => Kind::Uuid(parse_uuid(text)?),
        TypeCategory::Date => match parse_infinity(text) {
            Some(inf) => Kind::DateInfinity(inf as i32),
            None => Kind::Date(parse_date_value(text)?),
        },
        TypeCategory::Time => Kind::Time(parse_time_exact(text)?),
        TypeCategory::TimeTz => {
            let (micros, rest) = parse_time(text)?;
            let offset_seconds = parse_offset(rest)?;
            Kind::Timetz(v1::TimeTz {
                micros,
                offset_seconds,
            })
        }
        TypeCategory::Timestamp => match parse_infinity(text) {
            Some(inf) => Kind::TimestampInfinity(inf as i32),
            None => Kind::Timestamp(parse_timestamp(text, false)?),
        },
        TypeCategory::Timestamptz => match parse_infinity(text) {
            Some(inf) => Kind::TimestamptzInfinity(inf as i32),
            None => Kind::Timestamptz(parse_timestamp(text, true)?),
        },
        // Postgres 17+ has infinite intervals. The wire's Interval has no
        // room for them, and ClickHouse keeps intervals as text anyway: they
        // travel as the text Postgres prints, which the loader stores as is.
        TypeCategory::Interval if matches!(text, "infinity" | "-infinity") => {
            Kind::Text(text.to_owned())
        }
        TypeCategory::Interval => Kind::Interval(parse_interval(text)?),
    })
}

fn parse_bool(text: &str) -> Parsed<bool> {
    match text {
        "t" | "true" => Ok(true),
        "f" | "false" => Ok(false),
        _ => Err("boolean is not 't' or 'f'"),
    }
}

fn parse_float(text: &str) -> Parsed<f64> {
    match text {
        "NaN" => Ok(f64::NAN),
        "Infinity" => Ok(f64::INFINITY),
        "-Infinity" => Ok(f64::NEG_INFINITY),
        // Rust also accepts "inf"/"nan" spellings Postgres never prints; require
        // a digit so only real numbers reach `parse`.
        _ if text.bytes().any(|b| b.is_ascii_digit()) => {
            text.parse().map_err(|_| "not a floating point number")
        }
        _ => Err("not a floating point number"),
    }
}

/// Validates Postgres numeric output: `-?digits(.digits)?`, `NaN`, `±Infinity`.
fn parse_numeric(text: &str) -> Parsed<&str> {
    if matches!(text, "NaN" | "Infinity" | "-Infinity") {
        return Ok(text);
    }
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = match unsigned.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (unsigned, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits(int) && frac.is_none_or(digits) {
        Ok(text)
    } else {
        Err("not a decimal number")
    }
}

/// Money output under `lc_monetary=C` or `en_US`: `$1,234.56`, `-$1.00`, and
/// the parenthesised negative `($1.00)` some locales use. The result is plain
/// decimal text.
fn parse_money(text: &str) -> Parsed<String> {
    let negative = text.starts_with('-') || (text.starts_with('(') && text.ends_with(')'));
    let mut out = String::with_capacity(text.len());
    if negative {
        out.push('-');
    }
    let mut seen_digit = false;
    let mut seen_point = false;
    for c in text.chars() {
        match c {
            '0'..='9' => {
                seen_digit = true;
                out.push(c);
            }
            '.' if !seen_point && seen_digit => {
                seen_point = true;
                out.push(c);
            }
            '.' => return Err("misplaced decimal point in money"),
            // Sign, parentheses, currency symbol, grouping, spaces.
            '-' | '(' | ')' | ',' | ' ' | '$' => {}
            _ if !c.is_ascii_alphanumeric() && !seen_digit => {} // other currency symbols
            _ => return Err("unexpected character in money"),
        }
    }
    if !seen_digit || out.ends_with('.') {
        return Err("money without digits");
    }
    Ok(out)
}

fn hex_nibble(b: u8) -> Parsed<u8> {
    match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err("invalid hex digit"),
    }
}

/// bytea in `hex` (`\x0a0b`) or the legacy `escape` output format.
fn parse_bytea(text: &str) -> Parsed<Vec<u8>> {
    let bytes = text.as_bytes();
    if let Some(hex) = text.strip_prefix("\\x") {
        let hex = hex.as_bytes();
        if hex.len() % 2 != 0 {
            return Err("odd number of hex digits in bytea");
        }
        return hex
            .chunks_exact(2)
            .map(|pair| Ok(hex_nibble(pair[0])? << 4 | hex_nibble(pair[1])?))
            .collect();
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
        } else if bytes.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let octal = bytes.get(i + 1..i + 4).ok_or("truncated escape in bytea")?;
            let mut v: u16 = 0;
            for &d in octal {
                if !(b'0'..=b'7').contains(&d) {
                    return Err("invalid octal escape in bytea");
                }
                v = v * 8 + u16::from(d - b'0');
            }
            out.push(u8::try_from(v).map_err(|_| "octal escape out of range in bytea")?);
            i += 4;
        }
    }
    Ok(out)
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` into 16 bytes.
fn parse_uuid(text: &str) -> Parsed<Vec<u8>> {
    let b = text.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return Err("uuid is not in 8-4-4-4-12 form");
    }
    let hex: Vec<u8> = b.iter().copied().filter(|&c| c != b'-').collect();
    if hex.len() != 32 {
        return Err("uuid is not in 8-4-4-4-12 form");
    }
    hex.chunks_exact(2)
        .map(|pair| Ok(hex_nibble(pair[0])? << 4 | hex_nibble(pair[1])?))
        .collect()
}

fn parse_infinity(text: &str) -> Option<v1::Infinity> {
    match text {
        "infinity" => Some(v1::Infinity::Positive),
        "-infinity" => Some(v1::Infinity::Negative),
        _ => None,
    }
}

/// Days from 1970-01-01 to the proleptic Gregorian date with astronomical year
/// `y` (1 BC is year 0). Howard Hinnant's `days_from_civil`.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn is_leap(y: i64) -> bool {
    y.rem_euclid(4) == 0 && (y.rem_euclid(100) != 0 || y.rem_euclid(400) == 0)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// Parses exactly `n` ASCII digits.
fn fixed_digits(s: &str, n: usize) -> Parsed<u32> {
    let b = s.as_bytes();
    if b.len() != n || !b.iter().all(u8::is_ascii_digit) {
        return Err("expected digits");
    }
    Ok(b.iter().fold(0, |acc, &d| acc * 10 + u32::from(d - b'0')))
}

/// Splits a trailing ` BC` off.
fn strip_bc(text: &str) -> (&str, bool) {
    match text.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (text, false),
    }
}

/// `YYYY-MM-DD` (year of 4 or more digits, no era) into days since 1970.
fn parse_ymd(text: &str, bc: bool) -> Parsed<i64> {
    let mut parts = text.rsplitn(3, '-');
    let (Some(d), Some(m), Some(y)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("date is not YYYY-MM-DD (DateStyle must be ISO)");
    };
    if y.len() < 4 || y.len() > 9 || !y.bytes().all(|b| b.is_ascii_digit()) {
        return Err("date year is not 4 to 9 digits (DateStyle must be ISO)");
    }
    let year: i64 = y.parse().map_err(|_| "invalid year")?;
    let (m, d) = (fixed_digits(m, 2)?, fixed_digits(d, 2)?);
    if year == 0 {
        return Err("year 0 does not exist");
    }
    let year = if bc { 1 - year } else { year };
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(year, m) {
        return Err("day or month out of range");
    }
    Ok(days_from_civil(year, m, d))
}

fn parse_date_value(text: &str) -> Parsed<i32> {
    let (text, bc) = strip_bc(text);
    i32::try_from(parse_ymd(text, bc)?).map_err(|_| "date out of range")
}

/// `HH:MM:SS[.ffffff]` at the start of `text`; returns micros since midnight
/// and the rest of the text.
fn parse_time(text: &str) -> Parsed<(i64, &str)> {
    let b = text.as_bytes();
    if b.len() < 8 || b[2] != b':' || b[5] != b':' {
        return Err("time is not HH:MM:SS");
    }
    // `get`, not indexing: byte 8 may fall inside a multi-byte character.
    let field = |range| text.get(range).ok_or("time is not HH:MM:SS");
    let h = fixed_digits(field(0..2)?, 2)?;
    let m = fixed_digits(field(3..5)?, 2)?;
    let s = fixed_digits(field(6..8)?, 2)?;
    let (frac, rest) = parse_fraction(text.get(8..).ok_or("time is not HH:MM:SS")?)?;
    if h > 24 || m > 59 || s > 60 {
        return Err("time field out of range");
    }
    let micros =
        (i64::from(h) * 3600 + i64::from(m) * 60 + i64::from(s)) * MICROS_PER_SECOND + frac;
    if micros > MICROS_PER_DAY {
        return Err("time past 24:00:00");
    }
    Ok((micros, rest))
}

/// An optional `.f{1,6}` at the start of `text`, in microseconds.
fn parse_fraction(text: &str) -> Parsed<(i64, &str)> {
    let Some(after) = text.strip_prefix('.') else {
        return Ok((0, text));
    };
    let n = after.bytes().take_while(u8::is_ascii_digit).count();
    if n == 0 || n > 6 {
        return Err("fractional seconds are not 1 to 6 digits");
    }
    let mut frac = i64::from(fixed_digits(&after[..n], n)?);
    for _ in n..6 {
        frac *= 10;
    }
    Ok((frac, &after[n..]))
}

fn parse_time_exact(text: &str) -> Parsed<i64> {
    match parse_time(text)? {
        (micros, "") => Ok(micros),
        _ => Err("trailing characters after time"),
    }
}

/// A UTC offset `+HH`, `+HH:MM` or `+HH:MM:SS` (east positive), in seconds.
fn parse_offset(text: &str) -> Parsed<i32> {
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => return Err("missing UTC offset"),
    };
    let mut seconds = 0i32;
    let mut fields = 0;
    for (i, part) in rest.split(':').enumerate() {
        if i >= 3 {
            return Err("UTC offset has too many fields");
        }
        let v = i32::try_from(fixed_digits(part, 2)?).map_err(|_| "bad offset")?;
        if i > 0 && v > 59 {
            return Err("UTC offset field out of range");
        }
        seconds = seconds * 60 + v;
        fields = i + 1;
    }
    // Pad to seconds: "+05" is hours, "+05:30" is hours and minutes.
    for _ in fields..3 {
        seconds *= 60;
    }
    Ok(sign * seconds)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][offset][ BC]` into microseconds since the
/// epoch (UTC when `with_offset`).
fn parse_timestamp(text: &str, with_offset: bool) -> Parsed<i64> {
    let (text, bc) = strip_bc(text);
    let (date, time) = text
        .split_once(' ')
        .ok_or("timestamp is not 'YYYY-MM-DD HH:MM:SS' (DateStyle must be ISO)")?;
    let days = parse_ymd(date, bc)?;
    let (micros, rest) = parse_time(time)?;
    let offset = if with_offset {
        i64::from(parse_offset(rest)?)
    } else if rest.is_empty() {
        0
    } else {
        return Err("trailing characters after timestamp");
    };
    days.checked_mul(MICROS_PER_DAY)
        .and_then(|d| d.checked_add(micros))
        .and_then(|t| t.checked_sub(offset * MICROS_PER_SECOND))
        .ok_or("timestamp out of range")
}

/// IntervalStyle `postgres`: `[N year[s]] [N mon[s]] [N day[s]] [[+-]H:MM:SS[.f]]`,
/// e.g. `1 year 2 mons 3 days 04:05:06.789`, `-1 days +02:00:00`, `00:00:00`.
/// Hours may exceed 24 and have more than two digits.
fn parse_interval(text: &str) -> Parsed<v1::Interval> {
    let mut months: i64 = 0;
    let mut days: i64 = 0;
    let mut micros: i128 = 0;
    let mut saw_any = false;
    let mut saw_time = false;
    let mut tokens = text.split(' ');
    while let Some(tok) = tokens.next() {
        if tok.contains(':') {
            if saw_time {
                return Err("interval has two time parts");
            }
            saw_time = true;
            micros = parse_interval_time(tok)?;
        } else {
            if saw_time {
                return Err("interval unit after time part");
            }
            let n: i64 = tok
                .parse()
                .map_err(|_| "interval is not in IntervalStyle postgres")?;
            match tokens.next() {
                Some("year" | "years") => {
                    months += n.checked_mul(12).ok_or("interval years out of range")?
                }
                Some("mon" | "mons") => months += n,
                Some("day" | "days") => days += n,
                _ => return Err("unknown interval unit (IntervalStyle must be postgres)"),
            }
        }
        saw_any = true;
    }
    if !saw_any {
        return Err("empty interval");
    }
    Ok(v1::Interval {
        months: i32::try_from(months).map_err(|_| "interval months out of range")?,
        days: i32::try_from(days).map_err(|_| "interval days out of range")?,
        micros: i64::try_from(micros).map_err(|_| "interval time out of range")?,
    })
}

fn parse_interval_time(tok: &str) -> Parsed<i128> {
    let (negative, rest) = match tok.as_bytes().first() {
        Some(b'-') => (true, &tok[1..]),
        Some(b'+') => (false, &tok[1..]),
        _ => (false, tok),
    };
    let (h, rest) = rest.split_once(':').ok_or("bad interval time")?;
    if h.is_empty() || h.len() > 12 || !h.bytes().all(|b| b.is_ascii_digit()) {
        return Err("bad interval hours");
    }
    let hours: i128 = h.parse().map_err(|_| "bad interval hours")?;
    let b = rest.as_bytes();
    if b.len() < 5 || b[2] != b':' {
        return Err("bad interval time");
    }
    // `get`, not indexing: byte 5 may fall inside a multi-byte character.
    let field = |range| rest.get(range).ok_or("bad interval time");
    let m = fixed_digits(field(0..2)?, 2)?;
    let s = fixed_digits(field(3..5)?, 2)?;
    let (frac, tail) = parse_fraction(rest.get(5..).ok_or("bad interval time")?)?;
    if !tail.is_empty() || m > 59 || s > 59 {
        return Err("bad interval time");
    }
    let total = (hours * 3600 + i128::from(m) * 60 + i128::from(s)) * i128::from(MICROS_PER_SECOND)
        + i128::from(frac);
    Ok(if negative { -total } else { total })
}

/// A deterministic xorshift generator, for the tests that feed the parsers
/// arbitrary text.
#[cfg(test)]
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hostile text never panics (it did: `"00:00:0é"` sliced a character in
    /// two): every valid sample of every category with a multi-byte character
    /// put in, or put in place of, each byte position, as a scalar and inside
    /// an array.
    #[test]
    fn multi_byte_characters_anywhere_never_panic() {
        use TypeCategory as C;
        let samples: &[(TypeCategory, &str)] = &[
            (C::Bool, "t"),
            (C::Int, "-123"),
            (C::Float, "1.5e10"),
            (C::Numeric, "-12.3400"),
            (C::Money, "$1,234.56"),
            (C::Bytea, "\\xdeadbeef"),
            (C::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            (C::Json, "{\"a\": [1, 2]}"),
            (C::Date, "2024-02-29 BC"),
            (C::Time, "23:59:59.999999"),
            (C::TimeTz, "04:05:06.789+05:30"),
            (C::Timestamp, "2024-01-02 03:04:05.678901"),
            (C::Timestamptz, "2024-01-02 03:04:05.6+02:30:15"),
            (C::Interval, "1 year 2 mons -3 days +04:05:06.789"),
            (C::Text, "plain"),
        ];
        for &(category, sample) in samples {
            for bad in ["é", "€", "😀"] {
                for at in 0..=sample.len() {
                    let inserted = format!("{}{bad}{}", &sample[..at], &sample[at..]);
                    let replaced = format!(
                        "{}{bad}{}",
                        &sample[..at],
                        sample.get(at + 1..).unwrap_or("")
                    );
                    for text in [inserted, replaced] {
                        let _ = decode_text(&ty(category), &text);
                        let _ = decode_text(&arr(category), &format!("{{{text},{text}}}"));
                    }
                }
            }
        }
    }

    fn ty(category: TypeCategory) -> TypeInfo {
        TypeInfo::scalar(0, "t", category)
    }

    fn arr(category: TypeCategory) -> TypeInfo {
        TypeInfo::array_of(1, "_t", &ty(category))
    }

    fn kind(category: TypeCategory, text: &str) -> Kind {
        decode_text(&ty(category), text)
            .unwrap_or_else(|e| panic!("{text:?}: {e}"))
            .kind
            .unwrap()
    }

    fn fails(category: TypeCategory, text: &str) {
        assert!(
            decode_text(&ty(category), text).is_err(),
            "{text:?} should not decode as {category:?}"
        );
    }

    fn array(category: TypeCategory, text: &str) -> v1::Array {
        match decode_text(&arr(category), text) {
            Ok(v1::Value {
                kind: Some(Kind::Array(a)),
            }) => a,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    fn text(s: &str) -> v1::Value {
        v1::Value {
            kind: Some(Kind::Text(s.into())),
        }
    }

    fn int(i: i64) -> v1::Value {
        v1::Value {
            kind: Some(Kind::Int(i)),
        }
    }

    use TypeCategory as C;

    #[test]
    fn bools_and_ints() {
        assert_eq!(kind(C::Bool, "t"), Kind::Bool(true));
        assert_eq!(kind(C::Bool, "f"), Kind::Bool(false));
        fails(C::Bool, "yes");
        assert_eq!(kind(C::Int, "-32768"), Kind::Int(-32768));
        assert_eq!(kind(C::Int, "9223372036854775807"), Kind::Int(i64::MAX));
        assert_eq!(kind(C::Int, "-9223372036854775808"), Kind::Int(i64::MIN));
        assert_eq!(kind(C::Int, "4294967295"), Kind::Int(4_294_967_295)); // oid max
        fails(C::Int, "9223372036854775808");
        fails(C::Int, "1.5");
        fails(C::Int, "");
    }

    #[test]
    fn floats() {
        assert_eq!(kind(C::Float, "1.5"), Kind::Float(1.5));
        assert_eq!(
            kind(C::Float, "-1.2345678901234567e-300"),
            Kind::Float(-1.2345678901234567e-300)
        );
        assert_eq!(kind(C::Float, "1e+308"), Kind::Float(1e308));
        assert_eq!(kind(C::Float, "Infinity"), Kind::Float(f64::INFINITY));
        assert_eq!(kind(C::Float, "-Infinity"), Kind::Float(f64::NEG_INFINITY));
        assert!(matches!(kind(C::Float, "NaN"), Kind::Float(f) if f.is_nan()));
        assert_eq!(kind(C::Float, "-0"), Kind::Float(-0.0));
        fails(C::Float, "inf");
        fails(C::Float, "nan");
        fails(C::Float, "");
    }

    #[test]
    fn numerics_and_money() {
        for n in [
            "0",
            "-12.340",
            "NaN",
            "Infinity",
            "-Infinity",
            "123456789012345678901234567890.000000000001",
        ] {
            assert_eq!(kind(C::Numeric, n), Kind::Numeric(n.into()));
        }
        for bad in ["", "-", "1.", ".5", "1e5", "1.2.3", "+1", "nan"] {
            fails(C::Numeric, bad);
        }
        assert_eq!(kind(C::Money, "$1,234.56"), Kind::Numeric("1234.56".into()));
        assert_eq!(kind(C::Money, "-$1.00"), Kind::Numeric("-1.00".into()));
        assert_eq!(kind(C::Money, "($1.00)"), Kind::Numeric("-1.00".into()));
        assert_eq!(
            kind(C::Money, "-$92,233,720,368,547,758.08"),
            Kind::Numeric("-92233720368547758.08".into())
        );
        assert_eq!(kind(C::Money, "$0.00"), Kind::Numeric("0.00".into()));
        fails(C::Money, "$");
        fails(C::Money, "$1.2.3");
        fails(C::Money, "1 EUR");
    }

    #[test]
    fn text_json_bytea_uuid() {
        assert_eq!(kind(C::Text, ""), Kind::Text(String::new()));
        assert_eq!(
            kind(C::Text, "héllo 🦀 \\ \""),
            Kind::Text("héllo 🦀 \\ \"".into())
        );
        assert_eq!(
            kind(C::Json, r#"{"a": [1, null]}"#),
            Kind::Json(r#"{"a": [1, null]}"#.into())
        );
        assert_eq!(kind(C::Bytea, "\\x"), Kind::Bytes(vec![]));
        assert_eq!(
            kind(C::Bytea, "\\x00ff10Ab"),
            Kind::Bytes(vec![0, 255, 16, 171])
        );
        assert_eq!(
            kind(C::Bytea, "a\\\\b\\000\\377"),
            Kind::Bytes(b"a\\b\x00\xff".to_vec())
        );
        fails(C::Bytea, "\\x0");
        fails(C::Bytea, "\\xzz");
        fails(C::Bytea, "\\400");
        fails(C::Bytea, "\\1");
        assert_eq!(
            kind(C::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            Kind::Uuid(vec![
                0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
                0x0a, 0x11
            ])
        );
        fails(C::Uuid, "a0eebc999c0b4ef8bb6d6bb9bd380a11");
        fails(C::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1g");
        fails(C::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1é");
    }

    #[test]
    fn dates() {
        assert_eq!(kind(C::Date, "1970-01-01"), Kind::Date(0));
        assert_eq!(kind(C::Date, "2000-01-01"), Kind::Date(10_957));
        assert_eq!(kind(C::Date, "1969-12-31"), Kind::Date(-1));
        assert_eq!(kind(C::Date, "2024-02-29"), Kind::Date(19_782));
        assert_eq!(kind(C::Date, "0001-01-01"), Kind::Date(-719_162));
        // 1 BC is astronomical year 0, a leap year; the day before 0001-01-01.
        assert_eq!(kind(C::Date, "0001-12-31 BC"), Kind::Date(-719_163));
        assert_eq!(
            kind(C::Date, "0001-02-29 BC"),
            kind(C::Date, "0001-03-01 BC").date_minus(1)
        );
        // Julian day 0, Postgres's smallest date.
        assert_eq!(kind(C::Date, "4714-11-24 BC"), Kind::Date(-2_440_588));
        // Postgres's largest date (value checked against Postgres in tests/values_pg.rs).
        assert_eq!(kind(C::Date, "5874897-12-31"), Kind::Date(2_145_042_905));
        assert_eq!(
            kind(C::Date, "infinity"),
            Kind::DateInfinity(v1::Infinity::Positive as i32)
        );
        assert_eq!(
            kind(C::Date, "-infinity"),
            Kind::DateInfinity(v1::Infinity::Negative as i32)
        );
        for bad in [
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "0000-01-01",
            "24-01-01",
            "01/02/2024",
            "2024-1-01",
            "",
        ] {
            fails(C::Date, bad);
        }
    }

    trait DateMinus {
        fn date_minus(self, n: i32) -> Kind;
    }
    impl DateMinus for Kind {
        fn date_minus(self, n: i32) -> Kind {
            match self {
                Kind::Date(d) => Kind::Date(d - n),
                other => other,
            }
        }
    }

    #[test]
    fn times() {
        assert_eq!(kind(C::Time, "00:00:00"), Kind::Time(0));
        assert_eq!(kind(C::Time, "24:00:00"), Kind::Time(MICROS_PER_DAY));
        assert_eq!(kind(C::Time, "12:34:56.789"), Kind::Time(45_296_789_000));
        assert_eq!(
            kind(C::Time, "23:59:59.999999"),
            Kind::Time(MICROS_PER_DAY - 1)
        );
        for bad in [
            "24:00:01",
            "12:60:00",
            "1:00:00",
            "12:00:00.",
            "12:00:00.1234567",
            "12:00:00+01",
        ] {
            fails(C::Time, bad);
        }
        assert_eq!(
            kind(C::TimeTz, "12:34:56.789+05:30"),
            Kind::Timetz(v1::TimeTz {
                micros: 45_296_789_000,
                offset_seconds: 19_800
            })
        );
        assert_eq!(
            kind(C::TimeTz, "00:00:00-15:59:59"),
            Kind::Timetz(v1::TimeTz {
                micros: 0,
                offset_seconds: -57_599
            })
        );
        assert_eq!(
            kind(C::TimeTz, "01:02:03+00"),
            Kind::Timetz(v1::TimeTz {
                micros: 3_723_000_000,
                offset_seconds: 0
            })
        );
        fails(C::TimeTz, "01:02:03");
        fails(C::TimeTz, "01:02:03+5");
        fails(C::TimeTz, "01:02:03+05:30:00:00");
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            kind(C::Timestamp, "1970-01-01 00:00:00"),
            Kind::Timestamp(0)
        );
        assert_eq!(
            kind(C::Timestamp, "2024-01-02 03:04:05.123456"),
            Kind::Timestamp(1_704_164_645_123_456)
        );
        assert_eq!(
            kind(C::Timestamp, "1969-12-31 23:59:59.999999"),
            Kind::Timestamp(-1)
        );
        assert_eq!(
            kind(C::Timestamp, "0001-01-01 00:00:00"),
            Kind::Timestamp(-719_162 * MICROS_PER_DAY)
        );
        assert_eq!(
            kind(C::Timestamp, "0001-12-31 23:59:59 BC"),
            Kind::Timestamp(-719_162 * MICROS_PER_DAY - MICROS_PER_SECOND)
        );
        // The largest timestamp sint64 micros since 1970 can hold...
        assert_eq!(
            kind(C::Timestamp, "294247-01-10 04:00:54.775807"),
            Kind::Timestamp(i64::MAX)
        );
        // ...is below Postgres's largest (micros since 2000 in Postgres), so the
        // last ~30 years of Postgres's range are an error, not a wrong value.
        fails(C::Timestamp, "294247-01-10 04:00:54.775808");
        fails(C::Timestamp, "294276-12-31 23:59:59.999999");
        fails(C::Timestamptz, "294276-12-31 23:59:59.999999+00");
        assert_eq!(
            kind(C::Timestamp, "4714-11-24 00:00:00 BC"),
            Kind::Timestamp(-2_440_588 * MICROS_PER_DAY)
        );
        assert_eq!(
            kind(C::Timestamp, "infinity"),
            Kind::TimestampInfinity(v1::Infinity::Positive as i32)
        );
        fails(C::Timestamp, "2024-01-02T03:04:05");
        fails(C::Timestamp, "2024-01-02 03:04:05+00");
        fails(C::Timestamp, "99999999-01-02 03:04:05");
        assert_eq!(
            kind(C::Timestamptz, "2024-01-02 03:04:05.5+00"),
            Kind::Timestamptz(1_704_164_645_500_000)
        );
        assert_eq!(
            kind(C::Timestamptz, "2024-01-02 08:34:05+05:30"),
            Kind::Timestamptz(1_704_164_645_000_000)
        );
        assert_eq!(
            kind(C::Timestamptz, "1970-01-01 00:00:00-00:01:15"),
            Kind::Timestamptz(75_000_000)
        );
        assert_eq!(
            kind(C::Timestamptz, "0001-12-31 23:00:00+00 BC"),
            Kind::Timestamptz(-719_162 * MICROS_PER_DAY - 3600 * MICROS_PER_SECOND)
        );
        assert_eq!(
            kind(C::Timestamptz, "-infinity"),
            Kind::TimestamptzInfinity(v1::Infinity::Negative as i32)
        );
        fails(C::Timestamptz, "2024-01-02 03:04:05");
    }

    fn interval(months: i32, days: i32, micros: i64) -> Kind {
        Kind::Interval(v1::Interval {
            months,
            days,
            micros,
        })
    }

    #[test]
    fn intervals() {
        assert_eq!(kind(C::Interval, "00:00:00"), interval(0, 0, 0));
        // Postgres 17+.
        assert_eq!(kind(C::Interval, "infinity"), Kind::Text("infinity".into()));
        assert_eq!(
            kind(C::Interval, "-infinity"),
            Kind::Text("-infinity".into())
        );
        assert!(decode_scalar(C::Interval, "+infinity").is_err());
        assert_eq!(
            kind(C::Interval, "1 year 2 mons 3 days 04:05:06.789"),
            interval(14, 3, 14_706_789_000)
        );
        assert_eq!(
            kind(C::Interval, "-1 days +02:00:00"),
            interval(0, -1, 7_200_000_000)
        );
        assert_eq!(
            kind(C::Interval, "1 day -00:00:00.000001"),
            interval(0, 1, -1)
        );
        assert_eq!(kind(C::Interval, "-1 years -2 mons"), interval(-14, 0, 0));
        assert_eq!(kind(C::Interval, "1 mon"), interval(1, 0, 0));
        assert_eq!(
            kind(C::Interval, "100:00:00"),
            interval(0, 0, 360_000_000_000)
        );
        assert_eq!(
            kind(
                C::Interval,
                "178956970 years 7 mons 2147483647 days 2562047788:00:54.775807"
            ),
            interval(i32::MAX, i32::MAX, i64::MAX)
        );
        assert_eq!(
            kind(
                C::Interval,
                "-178956970 years -8 mons -2147483648 days -2562047788:00:54.775808"
            ),
            interval(i32::MIN, i32::MIN, i64::MIN)
        );
        for bad in [
            "",
            "1",
            "1 week",
            "@ 1 day",
            "P1D",
            "01:00:00 1 day",
            "1 day  01:00:00",
            "2562047788:00:54.775808",
            "1:2:3",
        ] {
            fails(C::Interval, bad);
        }
    }

    #[test]
    fn arrays() {
        let a = array(C::Int, "{1,2,NULL}");
        assert_eq!(a.dims, [3]);
        assert_eq!(a.lower_bounds, [1]);
        assert_eq!(a.elements, [int(1), int(2), null()]);

        let a = array(C::Text, r#"{"a b","c\"d",NULL,"NULL",null,"",\\x,"é,}{"}"#);
        assert_eq!(
            a.elements,
            [
                text("a b"),
                text("c\"d"),
                null(),
                text("NULL"),
                null(),
                text(""),
                text("\\x"),
                text("é,}{")
            ]
        );

        let a = array(C::Int, "{{1,2},{3,4},{5,NULL}}");
        assert_eq!(a.dims, [3, 2]);
        assert_eq!(a.lower_bounds, [1, 1]);
        assert_eq!(a.elements, [int(1), int(2), int(3), int(4), int(5), null()]);

        let a = array(C::Int, "{}");
        assert!(a.dims.is_empty() && a.lower_bounds.is_empty() && a.elements.is_empty());

        let a = array(C::Int, "[0:1]={1,2}");
        assert_eq!((a.dims, a.lower_bounds), (vec![2], vec![0]));
        let a = array(C::Int, "[-2:-1][3:3]={{7},{8}}");
        assert_eq!((a.dims, a.lower_bounds), (vec![2, 1], vec![-2, 3]));

        let a = array(C::Int, "{{{1}}}");
        assert_eq!(a.dims, [1, 1, 1]);

        let a = array(C::Date, "{1970-01-02,infinity}");
        assert_eq!(a.elements[0].kind, Some(Kind::Date(1)));

        let mut boxes = arr(C::Text);
        boxes.array_delimiter = Some(b';');
        let a = match decode_text(&boxes, "{(1,1),(0,0);(2,2),(1,1)}")
            .unwrap()
            .kind
        {
            Some(Kind::Array(a)) => a,
            other => panic!("{other:?}"),
        };
        assert_eq!(a.elements, [text("(1,1),(0,0)"), text("(2,2),(1,1)")]);

        for bad in [
            "",
            "{",
            "}",
            "{1,2",
            "{1,2}}",
            "{1,,2}",
            "{1,}",
            "{,1}",
            "{{1,2},{3}}",
            "{{1},2}",
            "{1,{2}}",
            "{{}}",
            "{{1},{}}",
            "{1}x",
            "{\"a}",
            "{a\"b\"}",
            "[1:2]={1}",
            "[1:1]",
            "[1:1]{1}",
            "[1:1][1:1]={1}",
            "{{{{{{{1}}}}}}}",
            "{1} {2}",
            "{\"a\"b}",
            "{x}",
        ] {
            assert!(
                decode_text(&arr(C::Int), bad).is_err(),
                "{bad:?} should not parse"
            );
        }
        // Element errors name the array type.
        let err = decode_text(&arr(C::Int), "{1,x}").unwrap_err();
        assert_eq!(err.type_name, "_t");
    }

    #[test]
    fn error_names_type_not_value() {
        let t = TypeInfo::scalar(oid::INT4, "int4", C::Int);
        let err = decode_text(&t, "secret-value").unwrap_err();
        assert_eq!(err.type_name, "int4");
        assert!(!err.to_string().contains("secret"));
    }

    /// Never panics, whatever the bytes (a cheap deterministic fuzz).
    #[test]
    fn arbitrary_input_never_panics() {
        let alphabet: Vec<char> = "{}[]:=,;\"\\ NULnul0123456789.-+eE:xBCinfty$()é🦀 "
            .chars()
            .collect();
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let categories = C::ALL;
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let s: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            for c in categories {
                let _ = decode_text(&ty(c), &s);
                let _ = decode_text(&arr(c), &s);
            }
        }
    }
}
