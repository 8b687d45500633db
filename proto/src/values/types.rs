//! What sluice knows about a Postgres type: how its text decodes.
//!
//! The replicator resolves each column's type through `pg_type` into a
//! [`TypeInfo`]; the wire's `Column` carries the [`TypeCategory`] and the
//! array delimiter, so the loader decodes a snapshot's `COPY` text with the
//! same parsers ([`super::decode_text`]).

use crate::v1;

/// Well-known OIDs of built-in scalar types (fixed in `pg_type.dat`, never
/// change between major versions).
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const MONEY: u32 = 790;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// How the text of a scalar value (or of each element of an array) decodes.
///
/// Decided by the scalar base type: a domain decodes as its base type, an array
/// element as the element's base type. Everything without a dedicated variant
/// (inet, ranges, composites, enums, ...) travels as [`TypeCategory::Text`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TypeCategory {
    Bool,
    /// int2, int4, int8, oid.
    Int,
    /// float4, float8.
    Float,
    Numeric,
    Money,
    Bytea,
    Uuid,
    /// json, jsonb.
    Json,
    Date,
    Time,
    TimeTz,
    Timestamp,
    Timestamptz,
    Interval,
    /// Anything carried as its text output.
    Text,
}

impl TypeCategory {
    /// The category of a non-domain, non-array type by OID; enums and unknown
    /// types are [`TypeCategory::Text`].
    pub fn of_scalar_oid(type_oid: u32) -> Self {
        match type_oid {
            oid::BOOL => Self::Bool,
            oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => Self::Int,
            oid::FLOAT4 | oid::FLOAT8 => Self::Float,
            oid::NUMERIC => Self::Numeric,
            oid::MONEY => Self::Money,
            oid::BYTEA => Self::Bytea,
            oid::UUID => Self::Uuid,
            oid::JSON | oid::JSONB => Self::Json,
            oid::DATE => Self::Date,
            oid::TIME => Self::Time,
            oid::TIMETZ => Self::TimeTz,
            oid::TIMESTAMP => Self::Timestamp,
            oid::TIMESTAMPTZ => Self::Timestamptz,
            oid::INTERVAL => Self::Interval,
            _ => Self::Text,
        }
    }
}

/// What sluice knows about one Postgres type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// The type's own OID (a domain's own OID for a domain).
    pub oid: u32,
    /// `pg_type.typname`, e.g. `int4`, `_int4` (array), `mood` (enum).
    pub name: String,
    /// Base, enum, domain, array or other (composite, range, pseudo, ...).
    pub kind: v1::TypeKind,
    /// For a domain: its base type after stripping all domain layers (for a
    /// domain over an array, that array type's OID). For an array: the scalar
    /// base type of its element (domain element stripped). Else `oid`.
    pub base_type_oid: u32,
    /// How a scalar value, or each array element, decodes.
    pub category: TypeCategory,
    /// `Some(delimiter)` when values of this type are arrays (arrays and domains
    /// over arrays); the delimiter is the element type's `typdelim`, `,` for
    /// everything but `box` (`;`).
    pub array_delimiter: Option<u8>,
}

impl TypeInfo {
    /// A non-array type decoding as `category` (its own base type).
    pub fn scalar(oid: u32, name: impl Into<String>, category: TypeCategory) -> Self {
        TypeInfo {
            oid,
            name: name.into(),
            kind: v1::TypeKind::Base,
            base_type_oid: oid,
            category,
            array_delimiter: None,
        }
    }

    /// An array type `oid` whose element decodes like `element`.
    pub fn array_of(oid: u32, name: impl Into<String>, element: &TypeInfo) -> Self {
        TypeInfo {
            oid,
            name: name.into(),
            kind: v1::TypeKind::Array,
            base_type_oid: element.base_type_oid,
            category: element.category,
            array_delimiter: Some(b','),
        }
    }

    /// Whether values of this type are arrays.
    pub fn is_array(&self) -> bool {
        self.array_delimiter.is_some()
    }
}

impl TypeCategory {
    /// Every category.
    pub const ALL: [TypeCategory; 15] = [
        Self::Bool,
        Self::Int,
        Self::Float,
        Self::Numeric,
        Self::Money,
        Self::Bytea,
        Self::Uuid,
        Self::Json,
        Self::Date,
        Self::Time,
        Self::TimeTz,
        Self::Timestamp,
        Self::Timestamptz,
        Self::Interval,
        Self::Text,
    ];

    /// The category as the wire's `Column.text_category` carries it.
    pub fn to_wire(self) -> v1::TextCategory {
        use v1::TextCategory as W;
        match self {
            Self::Bool => W::Bool,
            Self::Int => W::Int,
            Self::Float => W::Float,
            Self::Numeric => W::Numeric,
            Self::Money => W::Money,
            Self::Bytea => W::Bytea,
            Self::Uuid => W::Uuid,
            Self::Json => W::Json,
            Self::Date => W::Date,
            Self::Time => W::Time,
            Self::TimeTz => W::Timetz,
            Self::Timestamp => W::Timestamp,
            Self::Timestamptz => W::Timestamptz,
            Self::Interval => W::Interval,
            Self::Text => W::Text,
        }
    }

    /// The category a wire `Column.text_category` names; `None` for
    /// unspecified or unknown values (a column from an older replicator).
    pub fn from_wire(value: i32) -> Option<Self> {
        use v1::TextCategory as W;
        Some(match W::try_from(value).ok()? {
            W::Unspecified => return None,
            W::Bool => Self::Bool,
            W::Int => Self::Int,
            W::Float => Self::Float,
            W::Numeric => Self::Numeric,
            W::Money => Self::Money,
            W::Bytea => Self::Bytea,
            W::Uuid => Self::Uuid,
            W::Json => Self::Json,
            W::Date => Self::Date,
            W::Time => Self::Time,
            W::Timetz => Self::TimeTz,
            W::Timestamp => Self::Timestamp,
            W::Timestamptz => Self::Timestamptz,
            W::Interval => Self::Interval,
            W::Text => Self::Text,
        })
    }
}

impl TypeInfo {
    /// How a column of this type decodes, as the loader learns it from the
    /// wire's `Column` (`text_category`, `array_delimiter`): `None` when the
    /// column does not say (a relation from an older replicator).
    pub fn from_column(column: &v1::Column) -> Option<TypeInfo> {
        let category = TypeCategory::from_wire(column.text_category)?;
        let array_delimiter = match column.array_delimiter {
            0 => None,
            d => Some(u8::try_from(d).ok().filter(u8::is_ascii)?),
        };
        Some(TypeInfo {
            oid: column.type_oid,
            name: column.type_name.clone(),
            kind: v1::TypeKind::try_from(column.type_kind).unwrap_or(v1::TypeKind::Unspecified),
            base_type_oid: column.base_type_oid,
            category,
            array_delimiter,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_category_travels_as_itself_and_unspecified_as_none() {
        for category in TypeCategory::ALL {
            assert_eq!(
                TypeCategory::from_wire(category.to_wire() as i32),
                Some(category)
            );
        }
        let wire: std::collections::HashSet<i32> = TypeCategory::ALL
            .iter()
            .map(|c| c.to_wire() as i32)
            .collect();
        assert_eq!(wire.len(), TypeCategory::ALL.len(), "distinct");
        assert_eq!(TypeCategory::from_wire(0), None);
        assert_eq!(TypeCategory::from_wire(99), None);
        let column = v1::Column {
            type_name: "_box".into(),
            text_category: v1::TextCategory::Text as i32,
            array_delimiter: u32::from(b';'),
            ..Default::default()
        };
        let ty = TypeInfo::from_column(&column).expect("says how it decodes");
        assert_eq!(
            (ty.category, ty.array_delimiter),
            (TypeCategory::Text, Some(b';'))
        );
        let bad = v1::Column {
            array_delimiter: 0x1F600,
            ..column
        };
        assert_eq!(TypeInfo::from_column(&bad), None, "not a byte");
    }
}
