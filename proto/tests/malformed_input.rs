//! The package decoder takes untrusted bytes from the stream: whatever they
//! are, it returns a typed error (never a panic), and a damaged zstd frame
//! is an error, never a silently different package. A bounded, seeded run
//! that CI executes on every change; the cargo-fuzz target `package` in
//! `fuzz/` explores further (`scripts/fuzz` runs it, on stable Rust).

use sluice_proto::{DecodeError, Encoding, decode, encode, v1};

/// xorshift64*: deterministic, so a failure replays with the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn sample_package() -> v1::Package {
    v1::Package {
        source: "app".into(),
        schema: "public".into(),
        table: "orders".into(),
        commit_lsn: 0x1234_5678,
        commit_time_us: 1_700_000_000_000_000,
        position: Some(v1::ChainPosition {
            generation: 3,
            sequence: 17,
        }),
        kind: v1::Kind::Changes as i32,
        ..Default::default()
    }
}

#[test]
fn random_bytes_are_errors_not_panics() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let len = rng.below(512);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        for encoding in [None, Some("zstd"), Some("identity"), Some("gzip")] {
            match decode(&bytes, encoding) {
                Ok(_) => {}
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
    }
    assert!(matches!(
        decode(b"x", Some("gzip")),
        Err(DecodeError::UnknownEncoding(_))
    ));
}

#[test]
fn damaged_zstd_frames_never_decode_to_another_package() {
    let package = sample_package();
    let good = encode(&package, Encoding::Zstd);
    assert_eq!(decode(&good, None).unwrap(), package);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    // Every truncation of the frame is an error (the frame's end is missing).
    for cut in 0..good.len() {
        assert!(
            decode(&good[..cut], None).is_err(),
            "a frame cut at {cut} of {} bytes decoded",
            good.len()
        );
    }
    // Flipped bytes: an error, or (in the frame header's spare bits) the same package.
    for _ in 0..5_000 {
        let mut bad = good.clone();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(bad.len());
            bad[i] ^= 1 + rng.below(255) as u8;
        }
        if let Ok(decoded) = decode(&bad, None) {
            assert_eq!(
                decoded, package,
                "a damaged frame decoded to a different package"
            );
        }
    }
    // Damaged plain protobuf is allowed to decode (protobuf has no checksum),
    // but never panics.
    let plain = encode(&package, Encoding::Identity);
    for _ in 0..5_000 {
        let mut bad = plain.clone();
        let i = rng.below(bad.len());
        bad[i] = rng.next() as u8;
        bad.truncate(rng.below(bad.len() + 1));
        let _ = decode(&bad, Some("identity"));
    }
}
