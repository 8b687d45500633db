//! Fuzzes the pgoutput decoder: it must never panic, whatever the bytes and the decoder state.
//!
//! Input layout: the first byte picks the protocol version (0, 1 or 2); the rest is decoded twice,
//! once as a single message and once as a sequence of messages, each preceded by a one-byte length,
//! fed in order to one decoder so that stream-block state (protocol v2) is exercised too.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice_replicator::pgoutput::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&version, rest)) = data.split_first() else {
        return;
    };
    let version = u32::from(version % 3);
    let input = Bytes::copy_from_slice(rest);

    if let Err(e) = Decoder::new(version).decode(input.clone()) {
        // Error messages are formatted from input bytes too.
        let _ = e.to_string();
    }

    let mut decoder = Decoder::new(version);
    let mut pos = 0;
    while let Some(&len) = input.get(pos) {
        let start = pos + 1;
        let end = (start + usize::from(len)).min(input.len());
        if let Err(e) = decoder.decode(input.slice(start..end)) {
            let _ = e.to_string();
        }
        pos = end;
    }
});
