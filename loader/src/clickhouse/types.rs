//! Postgres → ClickHouse type mapping.
//!
//! Every Postgres column maps to exactly one ClickHouse type; nothing is
//! "unmapped": types without a faithful ClickHouse counterpart travel as their
//! Postgres text form in a `String` column, so no value is ever lost.
//!
//! | Postgres (by base type OID) | ClickHouse | notes |
//! |---|---|---|
//! | `int2` | `Int16` | |
//! | `int4` | `Int32` | |
//! | `int8` | `Int64` | |
//! | `oid` | `UInt32` | |
//! | `bool` | `Bool` | |
//! | `float4` | `Float32` | NaN and ±Infinity kept as IEEE values |
//! | `float8` | `Float64` | NaN and ±Infinity kept as IEEE values |
//! | `numeric(p,s)`, 1 ≤ p ≤ 76, 0 ≤ s ≤ p | `Decimal(p, s)` | `NaN` → 0, `±Infinity` → largest/smallest value; each counted as a clamp |
//! | `numeric` (unconstrained, p > 76, or negative scale) | `String` | the exact decimal text (`"-12.340"`, `"NaN"`, `"Infinity"`): lossless, because ClickHouse has no arbitrary-precision decimal |
//! | `money` | `Decimal(19, 2)` | |
//! | `text`, `varchar`, `bpchar`, `name`, `"char"` | `String` | |
//! | enum types | `LowCardinality(String)` | the label |
//! | `bytea` | `String` | the raw bytes (ClickHouse strings are byte strings) |
//! | `uuid` | `UUID` | |
//! | `json`, `jsonb` | `String` | the JSON text |
//! | `date` | `Date32` | clamped to 1900-01-01..2299-12-31 (`±infinity` → the bounds), counted |
//! | `time` | `Time64(6)` | microseconds since midnight (`24:00:00` included) |
//! | `timetz` | `String` | Postgres text form, e.g. `"13:45:00.5+02"` |
//! | `timestamp` | `DateTime64(6)` | clamped to 1900-01-01..2299-12-31 23:59:59.999999, counted |
//! | `timestamptz` | `DateTime64(6, 'UTC')` | clamped like `timestamp`, counted |
//! | `interval` | `String` | ISO 8601 duration as Postgres' `intervalstyle = iso_8601` prints it, e.g. `"P1Y2M3DT4H5M6.5S"` |
//! | `inet`, `cidr`, `macaddr`, ranges, composites, anything else | `String` | Postgres text form |
//! | domains | the mapping of the base type | |
//! | `T[]` (n dimensions) | `Array(…Array(Nullable(T')))` n deep | see below |
//!
//! `timestamp` values are stored as microseconds of the wall-clock time read as
//! UTC; `DateTime64(6)` without a zone displays them in the session time zone,
//! so readers on a non-UTC server set `session_timezone = 'UTC'` to see the
//! Postgres wall-clock value.
//!
//! Nullability: every column but the key columns becomes `Nullable(T)`
//! (`LowCardinality(Nullable(String))` for enums), `NOT NULL` or not: a
//! relation read from a pgoutput message rather than the catalog (after later
//! DDL) cannot tell, and a column whose ClickHouse type flipped with it would
//! cost a resync. Key columns are never Nullable (they are the `ORDER BY`
//! key), and neither are arrays: ClickHouse forbids
//! `Nullable(Array(…))`, so a NULL array is stored as the empty array. Array
//! elements are always `Nullable` because any Postgres array may contain NULLs.
//!
//! Array dimensions: Postgres does not enforce (nor report through
//! `format_type`) the number of dimensions of an array column. The depth is the
//! number of `[]` in `type_name` (at least 1), so a replicator that knows
//! `attndims` can spell `integer[][]` to get `Array(Array(Nullable(Int32)))`.
//! A value with fewer dimensions than the column is wrapped into the outer
//! dimensions; one with more is rejected as a definite error.

use std::fmt;

use sluice_proto::v1;

/// Postgres type OIDs the mapping knows (from `pg_type.dat`).
pub use sluice_proto::values::oid;

/// Largest precision of a ClickHouse `Decimal` (`Decimal256`).
pub const MAX_DECIMAL_PRECISION: u32 = 76;

/// A ClickHouse column type as sluice uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChType {
    Int16,
    Int32,
    Int64,
    UInt32,
    Bool,
    Float32,
    Float64,
    Decimal {
        precision: u32,
        scale: u32,
    },
    String,
    /// `LowCardinality(String)`; RowBinary encodes it as a plain `String`.
    LowCardinalityString,
    Uuid,
    Date32,
    /// `Time64(6)`: microseconds since midnight.
    Time64,
    /// `DateTime64(6)` (`utc = false`) or `DateTime64(6, 'UTC')`.
    DateTime64 {
        utc: bool,
    },
    Nullable(Box<ChType>),
    Array(Box<ChType>),
}

impl ChType {
    /// Wraps `self` so it can hold NULL, the way ClickHouse spells it.
    pub fn nullable(self) -> ChType {
        match self {
            ChType::Nullable(_) | ChType::Array(_) => self,
            other => ChType::Nullable(Box::new(other)),
        }
    }

    /// Size in bytes of a `Decimal` of this precision in RowBinary.
    pub fn decimal_width(precision: u32) -> usize {
        match precision {
            0..=9 => 4,
            10..=18 => 8,
            19..=38 => 16,
            _ => 32,
        }
    }
}

/// Prints the type exactly as ClickHouse normalises it in `system.columns.type`,
/// so schema drift can be found by string comparison.
impl fmt::Display for ChType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChType::Int16 => f.write_str("Int16"),
            ChType::Int32 => f.write_str("Int32"),
            ChType::Int64 => f.write_str("Int64"),
            ChType::UInt32 => f.write_str("UInt32"),
            ChType::Bool => f.write_str("Bool"),
            ChType::Float32 => f.write_str("Float32"),
            ChType::Float64 => f.write_str("Float64"),
            ChType::Decimal { precision, scale } => write!(f, "Decimal({precision}, {scale})"),
            ChType::String => f.write_str("String"),
            ChType::LowCardinalityString => f.write_str("LowCardinality(String)"),
            ChType::Uuid => f.write_str("UUID"),
            ChType::Date32 => f.write_str("Date32"),
            ChType::Time64 => f.write_str("Time64(6)"),
            ChType::DateTime64 { utc: false } => f.write_str("DateTime64(6)"),
            ChType::DateTime64 { utc: true } => f.write_str("DateTime64(6, 'UTC')"),
            // LowCardinality must be the outer wrapper.
            ChType::Nullable(inner) if **inner == ChType::LowCardinalityString => {
                f.write_str("LowCardinality(Nullable(String))")
            }
            ChType::Nullable(inner) => write!(f, "Nullable({inner})"),
            ChType::Array(inner) => write!(f, "Array({inner})"),
        }
    }
}

/// Precision and scale of a `numeric` type modifier, `None` when unconstrained.
///
/// Postgres stores `((precision << 16) | (scale & 0x7ff)) + 4` with an 11-bit
/// two's-complement scale (negative scales exist since Postgres 15).
pub fn numeric_typmod(type_modifier: i32) -> Option<(u32, i32)> {
    if type_modifier < 4 {
        return None;
    }
    let raw = type_modifier - 4;
    let precision = ((raw >> 16) & 0xffff) as u32;
    let scale = ((raw & 0x7ff) ^ 1024) - 1024;
    Some((precision, scale))
}

/// The scalar (non-array, non-null) ClickHouse type of a Postgres type OID.
fn scalar_type(type_oid: u32, type_modifier: i32, is_enum: bool) -> ChType {
    if is_enum {
        return ChType::LowCardinalityString;
    }
    match type_oid {
        oid::INT2 => ChType::Int16,
        oid::INT4 => ChType::Int32,
        oid::INT8 => ChType::Int64,
        oid::OID => ChType::UInt32,
        oid::BOOL => ChType::Bool,
        oid::FLOAT4 => ChType::Float32,
        oid::FLOAT8 => ChType::Float64,
        oid::NUMERIC => match numeric_typmod(type_modifier) {
            Some((precision, scale))
                if (1..=MAX_DECIMAL_PRECISION).contains(&precision)
                    && scale >= 0
                    && scale as u32 <= precision =>
            {
                ChType::Decimal {
                    precision,
                    scale: scale as u32,
                }
            }
            _ => ChType::String,
        },
        oid::MONEY => ChType::Decimal {
            precision: 19,
            scale: 2,
        },
        oid::UUID => ChType::Uuid,
        oid::DATE => ChType::Date32,
        oid::TIME => ChType::Time64,
        oid::TIMESTAMP => ChType::DateTime64 { utc: false },
        oid::TIMESTAMPTZ => ChType::DateTime64 { utc: true },
        // text, varchar, bpchar, name, "char", bytea, json(b), timetz,
        // interval, inet, cidr, macaddr and everything unknown.
        _ => ChType::String,
    }
}

/// Most array dimensions Postgres allows (`MAXDIM`).
pub const MAX_ARRAY_DIMS: usize = 6;

/// Number of array dimensions spelled in a `format_type` name (`int4[][]` →
/// 2), at most [`MAX_ARRAY_DIMS`]: the name comes from the package, and a
/// million `[]` must not nest a type a million deep.
fn array_depth(type_name: &str) -> usize {
    type_name.matches("[]").count().clamp(1, MAX_ARRAY_DIMS)
}

/// The ClickHouse type of a Postgres column (see the module table).
pub fn map_column(column: &v1::Column) -> ChType {
    let kind = v1::TypeKind::try_from(column.type_kind).unwrap_or(v1::TypeKind::Other);
    let ty = match kind {
        v1::TypeKind::Array => {
            // Elements of an enum array arrive as text; their OID is unknown here,
            // so they map to String like every other unknown OID.
            let mut ty = scalar_type(column.base_type_oid, column.type_modifier, false).nullable();
            for _ in 0..array_depth(&column.type_name) {
                ty = ChType::Array(Box::new(ty));
            }
            return ty;
        }
        v1::TypeKind::Enum => scalar_type(column.type_oid, column.type_modifier, true),
        v1::TypeKind::Domain => scalar_type(column.base_type_oid, column.type_modifier, false),
        v1::TypeKind::Base => scalar_type(column.type_oid, column.type_modifier, false),
        v1::TypeKind::Other | v1::TypeKind::Unspecified => ChType::String,
    };
    if !column.key { ty.nullable() } else { ty }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_type_name_of_a_million_brackets_nests_no_deeper_than_postgres_allows() {
        let mut a = col(1007, -1, v1::TypeKind::Array, "x", true);
        a.type_name = format!("integer{}", "[]".repeat(1_000_000));
        a.base_type_oid = 23;
        let mut depth = 0;
        let mut ty = map_column(&a);
        while let ChType::Array(inner) = ty {
            depth += 1;
            ty = *inner;
        }
        assert_eq!(depth, MAX_ARRAY_DIMS);
    }

    use super::*;

    fn col(
        type_oid: u32,
        typmod: i32,
        kind: v1::TypeKind,
        name: &str,
        nullable: bool,
    ) -> v1::Column {
        v1::Column {
            array_delimiter: 0,
            text_category: 0,
            name: "c".into(),
            type_oid,
            type_modifier: typmod,
            type_name: name.into(),
            nullable,
            key: false,
            type_kind: kind as i32,
            base_type_oid: type_oid,
            has_default: false,
            attnum: 0,
        }
    }

    #[test]
    fn numeric_typmods() {
        // numeric(10,2): ((10 << 16) | 2) + 4
        assert_eq!(numeric_typmod((10 << 16 | 2) + 4), Some((10, 2)));
        assert_eq!(numeric_typmod(-1), None);
        // numeric(3,-2) (Postgres 15+)
        assert_eq!(
            numeric_typmod((3 << 16 | (-2i32 & 0x7ff)) + 4),
            Some((3, -2))
        );
        let t = map_column(&col(
            oid::NUMERIC,
            (10 << 16 | 2) + 4,
            v1::TypeKind::Base,
            "numeric(10,2)",
            false,
        ));
        // NOT NULL, still Nullable (every non-key column is).
        assert_eq!(t.to_string(), "Nullable(Decimal(10, 2))");
        let t = map_column(&col(oid::NUMERIC, -1, v1::TypeKind::Base, "numeric", true));
        assert_eq!(t.to_string(), "Nullable(String)");
        let t = map_column(&col(
            oid::NUMERIC,
            (80 << 16) + 4,
            v1::TypeKind::Base,
            "numeric(80,0)",
            false,
        ));
        assert_eq!(t, ChType::String.nullable());
    }

    #[test]
    fn spelled_like_clickhouse() {
        let mut c = col(12345, -1, v1::TypeKind::Enum, "mood", true);
        assert_eq!(
            map_column(&c).to_string(),
            "LowCardinality(Nullable(String))"
        );
        c.key = true;
        assert_eq!(map_column(&c).to_string(), "LowCardinality(String)");
        let mut a = col(1007, -1, v1::TypeKind::Array, "integer[][]", true);
        a.base_type_oid = oid::INT4;
        assert_eq!(map_column(&a).to_string(), "Array(Array(Nullable(Int32)))");
        let t = map_column(&col(
            oid::TIMESTAMPTZ,
            -1,
            v1::TypeKind::Base,
            "timestamp with time zone",
            true,
        ));
        assert_eq!(t.to_string(), "Nullable(DateTime64(6, 'UTC'))");
        let mut d = col(99999, -1, v1::TypeKind::Domain, "posint", false);
        d.base_type_oid = oid::INT4;
        assert_eq!(map_column(&d), ChType::Int32.nullable());
        d.key = true;
        assert_eq!(map_column(&d), ChType::Int32);
    }
}
