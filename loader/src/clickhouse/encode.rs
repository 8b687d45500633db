//! RowBinary encoding of [`v1::Value`]s into the types of [`super::types`].
//!
//! RowBinary is ClickHouse's plain binary row format: values back to back in
//! column order, integers and floats little-endian, `String` as a LEB128
//! length and the bytes, `Nullable(T)` as a 1-byte flag (1 = NULL) followed by
//! `T` when not NULL, `Array(T)` as a LEB128 length and the elements,
//! `Decimal(p, s)` as the little-endian two's-complement integer
//! `value * 10^s` of 4/8/16/32 bytes by precision, `Date32` as days (i32),
//! `DateTime64(6)`/`Time64(6)` as microseconds (i64), `Bool` as one byte,
//! `LowCardinality(String)` like `String`, and `UUID` as its two 8-byte halves
//! each little-endian (so the 16 bytes of the canonical form reversed per
//! half — verified by round trip in the integration test).
//!
//! Values outside ClickHouse's ranges are clamped (and counted), never
//! wrapped: dates and timestamps to [`DATE32_MIN_DAYS`]..[`DATE32_MAX_DAYS`]
//! and [`DATETIME64_MIN_US`]..[`DATETIME64_MAX_US`] (the one set of clamp
//! bounds; `verify` clamps the Postgres side with them too), decimals to the
//! column's largest value; [`encode_value`] returns the count.

use sluice_proto::v1;
use sluice_proto::v1::value::Kind;

use super::error::ValueError;
use super::types::ChType;

/// Smallest `Date32`: 1900-01-01 in days since 1970-01-01.
pub const DATE32_MIN_DAYS: i32 = -25_567;
/// Largest `Date32`: 2299-12-31.
pub const DATE32_MAX_DAYS: i32 = 120_529;
/// Smallest `DateTime64(6)`: 1900-01-01 00:00:00 in microseconds.
pub const DATETIME64_MIN_US: i64 = -2_208_988_800_000_000;
/// Largest `DateTime64(6)`: 2299-12-31 23:59:59.999999.
pub const DATETIME64_MAX_US: i64 = 10_413_791_999_999_999;

pub fn write_varint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    write_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Null(_) => "null",
        Kind::UnchangedToast(_) => "unchanged_toast",
        Kind::Bool(_) => "bool",
        Kind::Int(_) => "int",
        Kind::Float(_) => "float",
        Kind::Numeric(_) => "numeric",
        Kind::Text(_) => "text",
        Kind::Bytes(_) => "bytes",
        Kind::Date(_) => "date",
        Kind::Time(_) => "time",
        Kind::Timetz(_) => "timetz",
        Kind::Timestamp(_) => "timestamp",
        Kind::Timestamptz(_) => "timestamptz",
        Kind::Interval(_) => "interval",
        Kind::Uuid(_) => "uuid",
        Kind::Json(_) => "json",
        Kind::Array(_) => "array",
        Kind::DateInfinity(_) => "date_infinity",
        Kind::TimestampInfinity(_) => "timestamp_infinity",
        Kind::TimestamptzInfinity(_) => "timestamptz_infinity",
    }
}

fn mismatch(kind: Option<&Kind>, ty: &ChType) -> ValueError {
    ValueError::KindMismatch {
        value: kind.map_or("missing", kind_name),
        ch_type: ty.to_string(),
    }
}

/// Writes the default value of `ty` (what a deleted row holds in its
/// non-key columns): NULL for Nullable, zero/empty otherwise.
pub fn write_default(out: &mut Vec<u8>, ty: &ChType) {
    let zeros = match ty {
        ChType::Nullable(_) => return out.push(1),
        ChType::String | ChType::LowCardinalityString | ChType::Array(_) => 1,
        ChType::Bool => 1,
        ChType::Int16 => 2,
        ChType::Int32 | ChType::UInt32 | ChType::Float32 | ChType::Date32 => 4,
        ChType::Int64 | ChType::Float64 | ChType::Time64 | ChType::DateTime64 { .. } => 8,
        ChType::Uuid => 16,
        ChType::Decimal { precision, .. } => ChType::decimal_width(*precision),
    };
    out.resize(out.len() + zeros, 0);
}

/// Encodes one value into `ty`. Returns how many clamps it took (0 or 1 per
/// scalar; arrays sum their elements).
pub fn encode_value(out: &mut Vec<u8>, ty: &ChType, value: &v1::Value) -> Result<u64, ValueError> {
    let kind = value.kind.as_ref();
    if let ChType::Nullable(inner) = ty {
        return match kind {
            Some(Kind::Null(_)) => {
                out.push(1);
                Ok(0)
            }
            _ => {
                out.push(0);
                encode_value(out, inner, value)
            }
        };
    }
    let Some(kind) = kind else {
        return Err(mismatch(None, ty));
    };
    if let (ChType::Array(_), Kind::Null(_)) = (ty, kind) {
        // ClickHouse has no Nullable(Array): NULL arrays are stored empty.
        out.push(0);
        return Ok(0);
    }
    if let Kind::Null(_) = kind {
        return Err(ValueError::UnexpectedNull);
    }
    let mut clamps = 0;
    match (ty, kind) {
        (ChType::Int16, Kind::Int(v)) => {
            let v = i16::try_from(*v).map_err(|_| ValueError::IntOutOfRange(*v))?;
            out.extend_from_slice(&v.to_le_bytes());
        }
        (ChType::Int32, Kind::Int(v)) => {
            let v = i32::try_from(*v).map_err(|_| ValueError::IntOutOfRange(*v))?;
            out.extend_from_slice(&v.to_le_bytes());
        }
        (ChType::Int64, Kind::Int(v)) => out.extend_from_slice(&v.to_le_bytes()),
        (ChType::UInt32, Kind::Int(v)) => {
            let v = u32::try_from(*v).map_err(|_| ValueError::IntOutOfRange(*v))?;
            out.extend_from_slice(&v.to_le_bytes());
        }
        (ChType::Bool, Kind::Bool(v)) => out.push(u8::from(*v)),
        (ChType::Float32, Kind::Float(v)) => out.extend_from_slice(&(*v as f32).to_le_bytes()),
        (ChType::Float64, Kind::Float(v)) => out.extend_from_slice(&v.to_le_bytes()),
        (ChType::Decimal { precision, scale }, Kind::Numeric(text)) => {
            clamps += encode_decimal(out, *precision, *scale, text)?;
        }
        (ChType::Uuid, Kind::Uuid(bytes)) => {
            let b: &[u8; 16] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| ValueError::BadUuid(bytes.len()))?;
            let hi = u64::from_be_bytes(b[..8].try_into().unwrap_or_default());
            let lo = u64::from_be_bytes(b[8..].try_into().unwrap_or_default());
            out.extend_from_slice(&hi.to_le_bytes());
            out.extend_from_slice(&lo.to_le_bytes());
        }
        (ChType::Date32, Kind::Date(days)) => {
            let clamped = (*days).clamp(DATE32_MIN_DAYS, DATE32_MAX_DAYS);
            clamps += u64::from(clamped != *days);
            out.extend_from_slice(&clamped.to_le_bytes());
        }
        (ChType::Date32, Kind::DateInfinity(inf)) => {
            let days = if infinity_is_negative(*inf) {
                DATE32_MIN_DAYS
            } else {
                DATE32_MAX_DAYS
            };
            clamps += 1;
            out.extend_from_slice(&days.to_le_bytes());
        }
        (ChType::Time64, Kind::Time(us)) => out.extend_from_slice(&us.to_le_bytes()),
        (ChType::DateTime64 { utc: false }, Kind::Timestamp(us))
        | (ChType::DateTime64 { utc: true }, Kind::Timestamptz(us)) => {
            let clamped = (*us).clamp(DATETIME64_MIN_US, DATETIME64_MAX_US);
            clamps += u64::from(clamped != *us);
            out.extend_from_slice(&clamped.to_le_bytes());
        }
        (ChType::DateTime64 { utc: false }, Kind::TimestampInfinity(inf))
        | (ChType::DateTime64 { utc: true }, Kind::TimestamptzInfinity(inf)) => {
            let us = if infinity_is_negative(*inf) {
                DATETIME64_MIN_US
            } else {
                DATETIME64_MAX_US
            };
            clamps += 1;
            out.extend_from_slice(&us.to_le_bytes());
        }
        (ChType::String | ChType::LowCardinalityString, kind) => match kind {
            Kind::Text(s) | Kind::Numeric(s) | Kind::Json(s) => write_bytes(out, s.as_bytes()),
            Kind::Bytes(b) => write_bytes(out, b),
            Kind::Timetz(t) => write_bytes(out, format_timetz(t).as_bytes()),
            Kind::Interval(i) => write_bytes(out, format_interval(i).as_bytes()),
            Kind::Int(v) => write_bytes(out, v.to_string().as_bytes()),
            Kind::Bool(v) => write_bytes(out, if *v { b"true" } else { b"false" }),
            Kind::Float(v) => write_bytes(out, format_float(*v).as_bytes()),
            other => return Err(mismatch(Some(other), ty)),
        },
        (ChType::Array(_), Kind::Array(array)) => {
            clamps += encode_array(out, ty, array)?;
        }
        (ty, kind) => return Err(mismatch(Some(kind), ty)),
    }
    Ok(clamps)
}

fn infinity_is_negative(value: i32) -> bool {
    value == v1::Infinity::Negative as i32
}

/// Postgres' float text: `NaN`, `Infinity`, `-Infinity` or the shortest
/// round-tripping decimal.
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        v.to_string()
    }
}

fn encode_array(out: &mut Vec<u8>, ty: &ChType, array: &v1::Array) -> Result<u64, ValueError> {
    let mut depth = 0;
    let mut elem = ty;
    while let ChType::Array(inner) = elem {
        depth += 1;
        elem = inner;
    }
    if array.dims.is_empty() {
        if !array.elements.is_empty() {
            return Err(ValueError::ArrayShape(vec![], array.elements.len()));
        }
        out.push(0);
        return Ok(0);
    }
    // Postgres writes no zero dimension (an empty array has no dimensions):
    // one would let the element count check pass while the outer dimensions
    // loop billions of times (`[4294967295, 0]`).
    if array.dims.contains(&0) {
        return Err(ValueError::ArrayShape(
            array.dims.clone(),
            array.elements.len(),
        ));
    }
    if array.dims.len() > depth {
        return Err(ValueError::ArrayDimensions {
            value: array.dims.len(),
            column: depth,
        });
    }
    // A value with fewer dimensions than the column is wrapped in outer
    // dimensions of length 1.
    let mut dims = vec![1u32; depth - array.dims.len()];
    dims.extend_from_slice(&array.dims);
    let total = dims
        .iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d as usize));
    if total != Some(array.elements.len()) {
        return Err(ValueError::ArrayShape(
            array.dims.clone(),
            array.elements.len(),
        ));
    }
    encode_dims(out, &dims, elem, &array.elements)
}

fn encode_dims(
    out: &mut Vec<u8>,
    dims: &[u32],
    elem: &ChType,
    elements: &[v1::Value],
) -> Result<u64, ValueError> {
    let Some((&len, rest)) = dims.split_first() else {
        return match elements {
            [value] => encode_value(out, elem, value),
            _ => Err(ValueError::ArrayShape(dims.to_vec(), elements.len())),
        };
    };
    write_varint(out, u64::from(len));
    let mut clamps = 0;
    if len == 0 {
        return Ok(0);
    }
    let chunk = elements.len() / len as usize;
    for i in 0..len as usize {
        clamps += encode_dims(out, rest, elem, &elements[i * chunk..(i + 1) * chunk])?;
    }
    Ok(clamps)
}

/// Encodes Postgres numeric text as `Decimal(precision, scale)`.
///
/// Extra fractional digits are rounded half away from zero (as Postgres
/// rounds numeric); a value with more integer digits than `precision - scale`
/// is a definite error (Postgres enforces the typmod, so it means the column
/// changed type). `NaN` becomes 0 and `±Infinity` the largest/smallest value,
/// each counted as a clamp.
pub fn encode_decimal(
    out: &mut Vec<u8>,
    precision: u32,
    scale: u32,
    text: &str,
) -> Result<u64, ValueError> {
    let width = ChType::decimal_width(precision);
    let (negative, digits, clamps) = match text {
        "NaN" => (false, vec![], 1),
        "Infinity" | "-Infinity" => (text.starts_with('-'), vec![9u8; precision as usize], 1),
        _ => {
            let (negative, digits) = scaled_digits(text, scale)
                .ok_or_else(|| ValueError::BadNumeric(text.to_owned()))?;
            if digits.len() > precision as usize {
                return Err(ValueError::DecimalOverflow(text.to_owned()));
            }
            (negative, digits, 0)
        }
    };
    // Magnitude as 256-bit little-endian limbs.
    let mut limbs = [0u64; 4];
    for d in digits {
        let mut carry = u128::from(d);
        for limb in &mut limbs {
            let v = u128::from(*limb) * 10 + carry;
            *limb = v as u64;
            carry = v >> 64;
        }
    }
    if negative {
        let mut carry = 1u128;
        for limb in &mut limbs {
            let v = u128::from(!*limb) + carry;
            *limb = v as u64;
            carry = v >> 64;
        }
    }
    let mut bytes = [0u8; 32];
    for (i, limb) in limbs.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&limb.to_le_bytes());
    }
    out.extend_from_slice(&bytes[..width]);
    Ok(clamps)
}

/// The digits of `text * 10^scale`, rounded half away from zero, without
/// leading zeros; `None` if `text` is not a plain decimal number.
fn scaled_digits(text: &str, scale: u32) -> Option<(bool, Vec<u8>)> {
    let (negative, body) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (int_part, frac_part) = body.split_once('.').unwrap_or((body, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    let all = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !all(int_part) || !all(frac_part) {
        return None;
    }
    let scale = scale as usize;
    let mut digits: Vec<u8> = int_part.bytes().map(|b| b - b'0').collect();
    let frac: Vec<u8> = frac_part.bytes().map(|b| b - b'0').collect();
    digits.extend((0..scale).map(|i| frac.get(i).copied().unwrap_or(0)));
    if frac.get(scale).is_some_and(|d| *d >= 5) {
        let mut i = digits.len();
        loop {
            if i == 0 {
                digits.insert(0, 1);
                break;
            }
            i -= 1;
            if digits[i] == 9 {
                digits[i] = 0;
            } else {
                digits[i] += 1;
                break;
            }
        }
    }
    let first = digits.iter().position(|d| *d != 0).unwrap_or(digits.len());
    digits.drain(..first);
    let negative = negative && !digits.is_empty();
    Some((negative, digits))
}

/// `timetz` as Postgres prints it: `HH:MM:SS[.ffffff]+HH[:MM[:SS]]`.
pub fn format_timetz(t: &v1::TimeTz) -> String {
    let mut s = format_time_of_day(t.micros);
    let offset = t.offset_seconds;
    s.push(if offset < 0 { '-' } else { '+' });
    let offset = offset.unsigned_abs();
    s.push_str(&format!("{:02}", offset / 3600));
    let (minutes, seconds) = (offset % 3600 / 60, offset % 60);
    if minutes != 0 || seconds != 0 {
        s.push_str(&format!(":{minutes:02}"));
        if seconds != 0 {
            s.push_str(&format!(":{seconds:02}"));
        }
    }
    s
}

fn format_time_of_day(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let mut s = format!(
        "{:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    );
    push_fraction(&mut s, frac as u64);
    s
}

fn push_fraction(s: &mut String, frac_micros: u64) {
    if frac_micros != 0 {
        let f = format!(".{frac_micros:06}");
        s.push_str(f.trim_end_matches('0'));
    }
}

/// `interval` as Postgres prints it with `intervalstyle = iso_8601`,
/// e.g. `P1Y2M3DT4H5M6.5S`, `P-1Y-2M`, `PT0S`.
pub fn format_interval(i: &v1::Interval) -> String {
    if i.months == 0 && i.days == 0 && i.micros == 0 {
        return "PT0S".into();
    }
    let mut s = String::from("P");
    let (years, months) = (i.months / 12, i.months % 12);
    for (n, unit) in [(years, 'Y'), (months, 'M'), (i.days, 'D')] {
        if n != 0 {
            s.push_str(&format!("{n}{unit}"));
        }
    }
    if i.micros != 0 {
        s.push('T');
        let hours = i.micros / 3_600_000_000;
        let minutes = i.micros % 3_600_000_000 / 60_000_000;
        let micros = i.micros % 60_000_000;
        if hours != 0 {
            s.push_str(&format!("{hours}H"));
        }
        if minutes != 0 {
            s.push_str(&format!("{minutes}M"));
        }
        if micros != 0 {
            if micros < 0 {
                s.push('-');
            }
            let abs = micros.unsigned_abs();
            s.push_str(&(abs / 1_000_000).to_string());
            push_fraction(&mut s, abs % 1_000_000);
            s.push('S');
        }
    }
    s
}

/// Length of the RowBinary encoding of one `ty` value at the start of `buf`,
/// or `None` if `buf` is too short or malformed. Used to split rows read back
/// from ClickHouse into their columns.
pub fn value_len(ty: &ChType, buf: &[u8]) -> Option<usize> {
    let fixed = match ty {
        ChType::Bool => 1,
        ChType::Int16 => 2,
        ChType::Int32 | ChType::UInt32 | ChType::Float32 | ChType::Date32 => 4,
        ChType::Int64 | ChType::Float64 | ChType::Time64 | ChType::DateTime64 { .. } => 8,
        ChType::Uuid => 16,
        ChType::Decimal { precision, .. } => ChType::decimal_width(*precision),
        ChType::String | ChType::LowCardinalityString => {
            let (len, n) = read_varint(buf)?;
            let total = n.checked_add(usize::try_from(len).ok()?)?;
            return (total <= buf.len()).then_some(total);
        }
        ChType::Nullable(inner) => {
            return match buf.first()? {
                1 => Some(1),
                _ => Some(1 + value_len(inner, buf.get(1..)?)?),
            };
        }
        ChType::Array(inner) => {
            let (len, mut pos) = read_varint(buf)?;
            for _ in 0..len {
                pos += value_len(inner, buf.get(pos..)?)?;
            }
            return Some(pos);
        }
    };
    (fixed <= buf.len()).then_some(fixed)
}

fn read_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int_array(dims: &[u32], count: usize) -> v1::Array {
        v1::Array {
            dims: dims.to_vec(),
            lower_bounds: dims.iter().map(|_| 1).collect(),
            elements: (0..count)
                .map(|i| v1::Value {
                    kind: Some(v1::value::Kind::Int(i as i64)),
                })
                .collect(),
        }
    }

    #[test]
    fn hostile_array_dimensions_are_refused_at_once() {
        let column = ChType::Array(Box::new(ChType::Array(Box::new(ChType::Int64))));
        let started = std::time::Instant::now();
        // 4,294,967,295 × 0 = 0 elements: used to loop 4×10⁹ times.
        for dims in [[u32::MAX, 0], [0, u32::MAX], [0, 0]] {
            let result = encode_array(&mut Vec::new(), &column, &int_array(&dims, 0));
            assert!(
                matches!(result, Err(ValueError::ArrayShape(..))),
                "{dims:?}: {result:?}"
            );
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // A product that does not match the elements, or overflows.
        assert!(
            encode_array(
                &mut Vec::new(),
                &column,
                &int_array(&[u32::MAX, u32::MAX], 1)
            )
            .is_err()
        );
        assert!(encode_array(&mut Vec::new(), &column, &int_array(&[2, 3], 5)).is_err());
        // More dimensions than the column.
        assert!(matches!(
            encode_array(&mut Vec::new(), &column, &int_array(&[1, 1, 1], 1)),
            Err(ValueError::ArrayDimensions {
                value: 3,
                column: 2
            })
        ));
        // Well-formed ones still encode.
        let mut out = Vec::new();
        encode_array(&mut out, &column, &int_array(&[2, 3], 6)).unwrap();
        assert_eq!(out[0], 2);
        let mut empty = Vec::new();
        encode_array(&mut empty, &column, &int_array(&[], 0)).unwrap();
        assert_eq!(empty, [0]);
    }

    fn dec(p: u32, s: u32, text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode_decimal(&mut out, p, s, text).unwrap();
        out
    }

    #[test]
    fn decimals() {
        assert_eq!(dec(10, 2, "12.345"), 1235i64.to_le_bytes());
        assert_eq!(dec(10, 2, "-12.344"), (-1234i64).to_le_bytes());
        assert_eq!(dec(5, 2, "-0.001"), 0i32.to_le_bytes());
        assert!(encode_decimal(&mut Vec::new(), 5, 2, "999.995").is_err());
        assert_eq!(dec(20, 0, "-1"), (-1i128).to_le_bytes());
        let big = dec(76, 0, &"9".repeat(76));
        assert_eq!(big.len(), 32);
        assert_eq!(dec(4, 1, "Infinity"), 9999i32.to_le_bytes());
        assert_eq!(dec(4, 1, "NaN"), 0i32.to_le_bytes());
        assert!(encode_decimal(&mut Vec::new(), 4, 1, "1e5").is_err());
    }

    #[test]
    fn texts() {
        let i = |months, days, micros| {
            format_interval(&v1::Interval {
                months,
                days,
                micros,
            })
        };
        assert_eq!(i(14, 3, 14_706_500_000), "P1Y2M3DT4H5M6.5S");
        assert_eq!(i(0, 0, 0), "PT0S");
        assert_eq!(i(-14, 0, -1_500_000), "P-1Y-2MT-1.5S");
        let t = format_timetz(&v1::TimeTz {
            micros: 49_500_500_000,
            offset_seconds: 7200,
        });
        assert_eq!(t, "13:45:00.5+02");
        let t = format_timetz(&v1::TimeTz {
            micros: 0,
            offset_seconds: -(5 * 3600 + 30 * 60),
        });
        assert_eq!(t, "00:00:00-05:30");
    }

    #[test]
    fn lengths() {
        let ty = ChType::Array(Box::new(ChType::Nullable(Box::new(ChType::String))));
        let buf = [2, 1, 0, 2, b'h', b'i', 0xff];
        assert_eq!(value_len(&ty, &buf), Some(6));
        assert_eq!(value_len(&ty, &buf[..4]), None);
    }
}
