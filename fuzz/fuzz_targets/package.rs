//! Fuzzes the package decoder (`sluice_proto::decode`): it must never panic, whatever the payload and
//! the encoding header.
//!
//! Input layout: the first byte picks the `Sluice-Encoding` header (none, `zstd`, `identity`, or an
//! arbitrary value: the input up to its first NUL byte); the rest is the payload. A payload that
//! decodes as plain protobuf must also survive a zstd round trip unchanged, so the protobuf decoding
//! behind a valid zstd frame (content checksum included) is exercised without the fuzzer having to
//! build such frames.
//!
//! The loader's row-at-a-time reader (`sluice_proto::rows`) must accept nothing prost rejects and read
//! exactly the rows prost decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_proto::rows::{RowReader, split};
use sluice_proto::{Encoding, Message as _, decode, decompress, encode, v1};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (encoding, payload) = match selector % 4 {
        0 => (None, rest),
        1 => (Some(Encoding::Zstd.as_str()), rest),
        2 => (Some(Encoding::Identity.as_str()), rest),
        _ => {
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let Ok(header) = std::str::from_utf8(&rest[..end]) else {
                return;
            };
            (Some(header), rest.get(end + 1..).unwrap_or_default())
        }
    };
    if let Ok(raw) = decompress(payload, encoding)
        && let Ok(parts) = split(&raw)
    {
        let mut reader = RowReader::default();
        let rows: Result<Vec<v1::Row>, _> = parts
            .rows
            .iter()
            .map(|range| reader.read(&raw[range.clone()]).cloned())
            .collect();
        if let Ok(rows) = rows {
            let package = v1::Package::decode(&*raw).expect("prost accepts what the row reader reads");
            let whole = v1::Package { rows, ..parts.header };
            assert_eq!(
                encode(&whole, Encoding::Identity),
                encode(&package, Encoding::Identity),
                "the row reader read other rows than prost"
            );
        }
    }
    match decode(payload, encoding) {
        // Error messages are formatted from input bytes too.
        Err(e) => {
            let _ = e.to_string();
        }
        Ok(package) => {
            // Compared as bytes: a package holding a NaN float is not equal to itself.
            let plain = encode(&package, Encoding::Identity);
            let again = decode(&encode(&package, Encoding::Zstd), None).expect("own zstd frame");
            assert_eq!(
                encode(&again, Encoding::Identity),
                plain,
                "zstd round trip changed it"
            );
        }
    }
});
