//! The sluice wire format.
//!
//! A NATS message body is one [`v1::Package`], protobuf-encoded and then
//! compressed as named by the [`ENCODING_HEADER`] NATS header. [`encode`] and
//! [`decode`] are the only ways the replicator and loader turn packages into
//! bytes and back, so the header contract lives in one place.
//!
//! [`decode`] takes untrusted bytes: it never panics, bounds the decompressed
//! size ([`MAX_DECODED_BYTES`]) and reports what was wrong in a typed error.
//! [`values`] parses the Postgres text packages start from: pgoutput's
//! values in the replicator, a snapshot package's `COPY` text in the loader.

use std::io::Read;

pub mod rows;
pub mod values;

/// Generated types of `proto/sluice/v1/package.proto`.
pub mod v1 {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/sluice.v1.rs"));
}

pub use prost;
pub use prost::Message;

/// NATS header naming the payload's compression: [`Encoding::as_str`].
pub const ENCODING_HEADER: &str = "Sluice-Encoding";
/// NATS header naming the payload's message type, so tools can tell formats apart.
pub const FORMAT_HEADER: &str = "Sluice-Format";
/// The value of [`FORMAT_HEADER`] for this version.
pub const FORMAT_PACKAGE_V1: &str = "sluice.v1.Package";

/// Upper bound on a decompressed package; anything larger is rejected as
/// malformed rather than allocated (a zstd bomb must not exhaust memory).
pub const MAX_DECODED_BYTES: usize = 512 * 1024 * 1024;

/// Compression of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// zstd frame (the default for everything the replicator publishes).
    Zstd,
    /// Plain protobuf.
    Identity,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Identity => "identity",
        }
    }

    /// Parses a header value; `None` for an unknown encoding.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "zstd" => Some(Encoding::Zstd),
            "identity" => Some(Encoding::Identity),
            _ => None,
        }
    }
}

/// Why a payload could not be turned into a package.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown payload encoding {0:?} in the {ENCODING_HEADER} header")]
    UnknownEncoding(String),
    #[error("payload is not a valid zstd frame")]
    Decompress(#[source] std::io::Error),
    #[error("decompressed payload exceeds the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("decompressed payload is larger than the {stated} bytes its zstd frame states")]
    LargerThanStated { stated: u64 },
    #[error("payload is not a valid sluice.v1.Package")]
    Protobuf(#[source] prost::DecodeError),
    #[error("payload is not a valid sluice.v1.Package: {0}")]
    Wire(&'static str),
    #[error("the package's COPY text does not decode")]
    Copy(#[source] values::copy::CopyError),
}

/// zstd level used for packages: level 1 keeps the replicator near the speed
/// of the network while still shrinking row data several times.
pub const ZSTD_LEVEL: i32 = 1;

/// Encodes a package as protobuf and compresses it.
pub fn encode(package: &v1::Package, encoding: Encoding) -> Vec<u8> {
    let raw = package.encode_to_vec();
    match encoding {
        Encoding::Identity => raw,
        Encoding::Zstd => zstd_compress(&raw),
    }
}

/// [`encode`] into `pool`, a buffer its caller keeps from package to
/// package. An uncompressed payload is cut from the pool and shares its
/// allocation, which the pool takes back once every payload cut from it is
/// dropped; a compressed one is compressed from it. With a fresh buffer per
/// package (freed on another thread, after its publish) the kernel zeroing
/// new pages for them was a tenth of the replicator's samples in a snapshot
/// (`perf`); with the pool, half that.
pub fn encode_pooled(
    package: &v1::Package,
    encoding: Encoding,
    pool: &mut bytes::BytesMut,
) -> bytes::Bytes {
    make_room(pool, package.encoded_len());
    // A BytesMut grows as needed: encoding into it cannot fail.
    let _ = package.encode(pool);
    match encoding {
        Encoding::Identity => pool.split().freeze(),
        Encoding::Zstd => {
            let payload = zstd_compress(pool);
            pool.clear();
            payload.into()
        }
    }
}

/// Makes room for `need` more bytes in a buffer reused from package to
/// package (see [`encode_pooled`]): when what is left is too small, the
/// buffer takes back its allocation if nothing cut from it is alive, or
/// else moves to a fresh one of [`POOL_BYTES`] (or `need`, if more).
pub fn make_room(pool: &mut bytes::BytesMut, need: usize) {
    if pool.capacity() < need {
        pool.reserve(need.max(POOL_BYTES));
    }
}

/// What a pooled buffer reserves at once: several packages of the default
/// `package_max_bytes`.
const POOL_BYTES: usize = 4 << 20;

/// With the frame's content checksum, a damaged payload is an error at
/// decode time rather than a silently different package (protobuf itself
/// has no checksum). Compressing an in-memory buffer cannot fail short of
/// allocation failure. This thread's compressor is reused: creating a
/// context per package was a visible share of the replicator's time.
fn zstd_compress(raw: &[u8]) -> Vec<u8> {
    COMPRESSOR
        .with(|cell| match &mut *cell.borrow_mut() {
            Ok(compressor) => compressor.compress(raw),
            Err(error) => Err(std::io::Error::new(error.kind(), error.to_string())),
        })
        .unwrap_or_else(|_| unreachable!("zstd compression of an in-memory buffer failed"))
}

thread_local! {
    static COMPRESSOR: std::cell::RefCell<std::io::Result<zstd::bulk::Compressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).and_then(|mut compressor| {
            compressor.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
            Ok(compressor)
        }));
}

/// Largest stated frame size decompressed in one go (into a buffer of that
/// size allocated up front).
const ONE_SHOT_MAX_BYTES: u64 = 64 * 1024 * 1024;

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<std::io::Result<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new());
}

/// Decompresses and decodes a payload. `encoding` is the value of the
/// [`ENCODING_HEADER`] header; a missing header means [`Encoding::Zstd`].
pub fn decode(payload: &[u8], encoding: Option<&str>) -> Result<v1::Package, DecodeError> {
    let raw = decompress(payload, encoding)?;
    v1::Package::decode(&*raw).map_err(DecodeError::Protobuf)
}

/// [`decode`], with a snapshot package's `copy_text` decoded into its rows
/// ([`values::copy::materialize`]).
pub fn decode_with_rows(
    payload: &[u8],
    encoding: Option<&str>,
) -> Result<v1::Package, DecodeError> {
    package_with_rows(&decompress(payload, encoding)?)
}

/// The package in `raw` (protobuf bytes, already decompressed), with a
/// snapshot package's `copy_text` decoded into its rows.
pub fn package_with_rows(raw: &[u8]) -> Result<v1::Package, DecodeError> {
    let mut package = v1::Package::decode(raw).map_err(DecodeError::Protobuf)?;
    values::copy::materialize(&mut package).map_err(DecodeError::Copy)?;
    Ok(package)
}

/// Decompresses a payload into the protobuf bytes of its package (for
/// [`rows::split`]), up to [`MAX_DECODED_BYTES`]; see [`decode`].
pub fn decompress<'p>(
    payload: &'p [u8],
    encoding: Option<&str>,
) -> Result<std::borrow::Cow<'p, [u8]>, DecodeError> {
    decompress_limited(payload, encoding, MAX_DECODED_BYTES)
}

/// What decompressing a payload may produce, decided from its header alone
/// (shared by [`decoded_size_bound`] and [`decompress_limited`], so the
/// bound is the one decompression keeps).
struct Plan {
    encoding: Encoding,
    /// The size a zstd frame states.
    stated: Option<u64>,
    /// The most bytes the output may have.
    most: usize,
    /// The caller's limit, at most [`MAX_DECODED_BYTES`].
    limit: usize,
}

fn plan(payload: &[u8], encoding: Option<&str>, limit: usize) -> Result<Plan, DecodeError> {
    let limit = limit.min(MAX_DECODED_BYTES);
    let encoding = match encoding {
        None => Encoding::Zstd,
        Some(value) => {
            Encoding::parse(value).ok_or_else(|| DecodeError::UnknownEncoding(value.to_owned()))?
        }
    };
    let (stated, most) = match encoding {
        Encoding::Identity => (None, payload.len()),
        Encoding::Zstd => match zstd::zstd_safe::get_frame_content_size(payload)
            .ok()
            .flatten()
        {
            Some(size) => (Some(size), usize::try_from(size).unwrap_or(usize::MAX)),
            None => (None, limit),
        },
    };
    if most > limit {
        return Err(DecodeError::TooLarge { limit });
    }
    Ok(Plan {
        encoding,
        stated,
        most,
        limit,
    })
}

/// The most bytes [`decompress_limited`] can return for `payload`, known
/// before decompressing it: its own size, or what its zstd frame states
/// (the output is held to that), or `limit` when the frame states nothing.
/// `None` when it is refused at once (a stated size over `limit`, an
/// unknown encoding): nothing is allocated for it.
pub fn decoded_size_bound(payload: &[u8], encoding: Option<&str>, limit: usize) -> Option<usize> {
    plan(payload, encoding, limit).ok().map(|plan| plan.most)
}

/// [`decompress`] with a caller's bound on the output: never allocates more
/// than [`decoded_size_bound`] says, whatever the bytes claim.
pub fn decompress_limited<'p>(
    payload: &'p [u8],
    encoding: Option<&str>,
    limit: usize,
) -> Result<std::borrow::Cow<'p, [u8]>, DecodeError> {
    let plan = plan(payload, encoding, limit)?;
    if plan.encoding == Encoding::Identity {
        return Ok(std::borrow::Cow::Borrowed(payload));
    }
    // Frames from `encode` state their size: decompress in one go with this
    // thread's reused context (creating one per package was a visible share
    // of the loader's time). The output buffer is the stated size, so more
    // data is an error, not an allocation. Bigger stated sizes take the
    // streaming path, which allocates as the data really arrives rather than
    // what the header claims, and is held to the stated size as well.
    if let Some(size) = plan.stated
        && size <= ONE_SHOT_MAX_BYTES
    {
        let raw = DECOMPRESSOR.with(|cell| match &mut *cell.borrow_mut() {
            Ok(decompressor) => decompressor.decompress(payload, size as usize),
            Err(error) => Err(std::io::Error::new(error.kind(), error.to_string())),
        });
        return raw.map(Into::into).map_err(DecodeError::Decompress);
    }
    let decoder = zstd::stream::read::Decoder::new(payload).map_err(DecodeError::Decompress)?;
    let mut raw = Vec::new();
    decoder
        .take(plan.most as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(DecodeError::Decompress)?;
    if raw.len() > plan.most {
        return Err(match plan.stated {
            Some(stated) => DecodeError::LargerThanStated { stated },
            None => DecodeError::TooLarge { limit: plan.limit },
        });
    }
    Ok(raw.into())
}

/// The version of row `index` of a package: orders every change of a row.
///
/// Change rows: `commit_lsn << 64 | ordinal`, the ordinal being the row's
/// position within its transaction. Snapshot rows: `(commit_lsn - 1) << 64 |
/// ordinal`, where `commit_lsn` is the snapshot's consistent point. Every
/// transaction missing from a snapshot commits at or after its consistent
/// point, so any streamed change of a row beats the snapshot's copy of it,
/// even a change committed at exactly the consistent point; every transaction
/// the snapshot saw committed before it, so the snapshot beats those.
pub fn row_version(package: &v1::Package, index: usize) -> u128 {
    let base = if package.kind == v1::Kind::Snapshot as i32 {
        package.commit_lsn.saturating_sub(1)
    } else {
        package.commit_lsn
    };
    (u128::from(base) << 64) | u128::from(package.first_row_ordinal + index as u64)
}

#[cfg(test)]
mod tests {
    use super::v1::{self, value::Kind as V};
    use super::*;

    fn value(kind: V) -> v1::Value {
        v1::Value { kind: Some(kind) }
    }

    fn sample(rows: usize) -> v1::Package {
        let relation = v1::Relation {
            oid: 16384,
            replica_identity: "d".into(),
            publication: String::new(),
            columns: vec![
                v1::Column {
                    array_delimiter: 0,
                    text_category: 0,
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                    type_name: "bigint".into(),
                    nullable: false,
                    key: true,
                    type_kind: v1::TypeKind::Base as i32,
                    base_type_oid: 20,
                    has_default: false,
                    attnum: 0,
                },
                v1::Column {
                    array_delimiter: 0,
                    text_category: 0,
                    name: "body".into(),
                    type_oid: 25,
                    type_modifier: -1,
                    type_name: "text".into(),
                    nullable: true,
                    key: false,
                    type_kind: v1::TypeKind::Base as i32,
                    base_type_oid: 25,
                    has_default: false,
                    attnum: 0,
                },
            ],
        };
        v1::Package {
            copy_rows: 0,
            copy_text: Default::default(),
            source: "app".into(),
            schema: "public".into(),
            table: "orders".into(),
            kind: v1::Kind::Changes as i32,
            relation: Some(relation),
            position: Some(v1::ChainPosition {
                generation: 7,
                sequence: 42,
            }),
            commit_lsn: 0x1_6B37_4D48,
            commit_time_us: 1_700_000_000_000_000,
            xid: 771,
            package_index: 3,
            first_row_ordinal: 3000,
            rows: (0..rows)
                .map(|i| v1::Row {
                    op: v1::Op::Insert as i32,
                    values: vec![
                        value(V::Int(i as i64)),
                        value(V::Text(format!("order number {i} for customer {}", i % 97))),
                    ],
                    old_key: vec![],
                })
                .collect(),
            truncate: None,
            resync: None,
            last_in_transaction: false,
            snapshot_progress: None,
        }
    }

    #[test]
    fn round_trip_keeps_every_field_and_value_kind() {
        let mut package = sample(1);
        package.rows[0].values = vec![
            value(V::Null(v1::Null {})),
            value(V::UnchangedToast(v1::UnchangedToast {})),
            value(V::Bool(true)),
            value(V::Int(i64::MIN)),
            value(V::Float(f64::INFINITY)),
            value(V::Numeric("-12345678901234567890.000001".into())),
            value(V::Text("zürich ✓".into())),
            value(V::Bytes(vec![0, 255, 1])),
            value(V::Date(-719_162)),
            value(V::Time(86_399_999_999)),
            value(V::Timetz(v1::TimeTz {
                micros: 1,
                offset_seconds: -34_200,
            })),
            value(V::Timestamp(-1)),
            value(V::Timestamptz(i64::MAX)),
            value(V::Interval(v1::Interval {
                months: -1,
                days: 2,
                micros: 3,
            })),
            value(V::Uuid(vec![7; 16])),
            value(V::Json("{\"a\":[1,2]}".into())),
            value(V::Array(v1::Array {
                dims: vec![2, 1],
                lower_bounds: vec![1, 1],
                elements: vec![value(V::Int(1)), value(V::Null(v1::Null {}))],
            })),
            value(V::DateInfinity(v1::Infinity::Positive as i32)),
            value(V::TimestampInfinity(v1::Infinity::Negative as i32)),
            value(V::TimestamptzInfinity(v1::Infinity::Positive as i32)),
        ];
        package.rows[0].old_key = vec![value(V::Int(9))];
        for encoding in [Encoding::Zstd, Encoding::Identity] {
            let bytes = encode(&package, encoding);
            let back = decode(&bytes, Some(encoding.as_str())).expect("decodes");
            assert_eq!(back, package, "{encoding:?}");
        }
    }

    #[test]
    fn nan_survives_round_trip() {
        let mut package = sample(1);
        package.rows[0].values = vec![value(V::Float(f64::NAN))];
        let back = decode(&encode(&package, Encoding::Zstd), None).expect("decodes");
        match back.rows[0].values[0].kind {
            Some(V::Float(f)) => assert!(f.is_nan()),
            ref other => panic!("expected a float, got {other:?}"),
        }
    }

    #[test]
    fn every_frame_of_the_reused_compressor_carries_a_checksum() {
        for rows in [1, 1000, 3] {
            let payload = encode(&sample(rows), Encoding::Zstd);
            // Frame header descriptor (after the 4-byte magic), bit 2:
            // Content_Checksum_flag.
            assert_ne!(payload[4] & 0x04, 0, "frame of {rows} rows has no checksum");
            assert_eq!(decode(&payload, None).unwrap(), sample(rows));
        }
    }

    #[test]
    fn zstd_shrinks_a_typical_package_several_times() {
        let package = sample(1000);
        let raw = encode(&package, Encoding::Identity).len();
        let compressed = encode(&package, Encoding::Zstd).len();
        // 1000 rows of (int8, short text) must stay small enough that a
        // default 1 MiB NATS payload holds several thousand rows.
        assert!(raw < 60_000, "raw protobuf is {raw} bytes");
        assert!(compressed * 4 < raw, "zstd {compressed} vs raw {raw}");
    }

    #[test]
    fn malformed_payloads_are_typed_errors() {
        assert!(matches!(
            decode(b"not zstd", None),
            Err(DecodeError::Decompress(_))
        ));
        assert!(matches!(
            decode(b"\xff\xff\xff", Some("identity")),
            Err(DecodeError::Protobuf(_))
        ));
        assert!(matches!(
            decode(b"", Some("gzip")),
            Err(DecodeError::UnknownEncoding(_))
        ));
        let truncated = encode(&sample(10), Encoding::Zstd);
        assert!(decode(&truncated[..truncated.len() / 2], None).is_err());
    }

    /// A zstd frame of `size` zero bytes; `state_size` false leaves the
    /// size out of the header, as a streaming compressor does.
    fn zeros_frame(size: usize, state_size: bool) -> Vec<u8> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        if state_size {
            encoder.set_pledged_src_size(Some(size as u64)).unwrap();
        }
        std::io::Write::write_all(&mut encoder, &vec![0u8; size]).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn decompression_never_goes_past_the_callers_limit() {
        let limit = 1 << 20;
        // Stated and within: decoded, and the bound is what the frame says.
        let small = zeros_frame(1000, true);
        assert_eq!(decoded_size_bound(&small, None, limit), Some(1000));
        assert_eq!(decompress_limited(&small, None, limit).unwrap().len(), 1000);
        // Stated over the limit: refused before anything is allocated.
        let big = zeros_frame(2 << 20, true);
        assert_eq!(decoded_size_bound(&big, None, limit), None);
        assert!(matches!(
            decompress_limited(&big, None, limit),
            Err(DecodeError::TooLarge { limit: l }) if l == limit
        ));
        // Not stated: the limit bounds it, on the streaming path.
        let unstated = zeros_frame(2 << 20, false);
        assert_eq!(decoded_size_bound(&unstated, None, limit), Some(limit));
        assert!(matches!(
            decompress_limited(&unstated, None, limit),
            Err(DecodeError::TooLarge { .. })
        ));
        assert_eq!(
            decompress_limited(&unstated, None, 4 << 20).unwrap().len(),
            2 << 20
        );
        // A first frame that understates what follows it: held to its word.
        let mut lying = zeros_frame(1000, true);
        lying.extend(zeros_frame(100_000, true));
        assert!(decompress_limited(&lying, None, limit).is_err());
        // Uncompressed payloads count as they are.
        assert_eq!(decoded_size_bound(&[0; 10], Some("identity"), 5), None);
        assert!(matches!(
            decompress_limited(&[0; 10], Some("identity"), 5),
            Err(DecodeError::TooLarge { limit: 5 })
        ));
    }
    #[test]
    fn versions_order_by_commit_then_ordinal() {
        let mut a = sample(2);
        let v0 = row_version(&a, 0);
        let v1 = row_version(&a, 1);
        assert!(v0 < v1);
        a.commit_lsn += 1;
        a.first_row_ordinal = 0;
        assert!(
            row_version(&a, 0) > v1,
            "a later commit wins over any ordinal"
        );
    }

    #[test]
    fn a_change_at_the_consistent_point_beats_the_snapshot_row() {
        let mut snapshot = sample(1);
        snapshot.kind = v1::Kind::Snapshot as i32;
        snapshot.commit_lsn = 1000;
        snapshot.first_row_ordinal = 5_000_000;
        let mut change = sample(1);
        change.commit_lsn = 1000;
        change.first_row_ordinal = 0;
        assert!(row_version(&change, 0) > row_version(&snapshot, 0));
        change.commit_lsn = 999;
        assert!(
            row_version(&change, 0) < row_version(&snapshot, 0),
            "the snapshot saw commits before its consistent point"
        );
    }
}
