//! Fuzzes the chunk reassembler (`sluice_broker::chunk::Reassembler`): whatever sequence of messages
//! and chunk headers arrives, it must never panic, must hand a whole package back unchanged, and may
//! only complete a set at its last part.
//!
//! Input: a sequence of messages (decoded with `arbitrary`) on two subjects, each with no chunk
//! headers, well-formed `i/k` headers naming one of two package IDs (or none), or an arbitrary
//! `Sluice-Chunk` value.
#![no_main]

use async_nats::HeaderMap;
use bytes::Bytes;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use sluice_broker::chunk::{CHUNK_HEADER, PACKAGE_ID_HEADER, Piece, Reassembler};

#[derive(Arbitrary, Debug)]
struct Message {
    second_subject: bool,
    chunk: Option<Chunk>,
    payload: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Chunk {
    /// `index/count` (small numbers, so sets do complete), package ID `p`, `q` or missing.
    Parts {
        index: u8,
        count: u8,
        package_id: Option<bool>,
    },
    /// Any `Sluice-Chunk` value.
    Raw(String),
}

fuzz_target!(|messages: Vec<Message>| {
    let mut reassembler = Reassembler::default();
    for (pushed, message) in messages.into_iter().enumerate() {
        // A header value on the wire cannot hold a line break (async-nats panics on one): the
        // input ends there.
        if let Some(Chunk::Raw(value)) = &message.chunk
            && value.contains(['\r', '\n'])
        {
            return;
        }
        let subject = if message.second_subject { "b" } else { "a" };
        let payload = Bytes::from(message.payload);
        let mut last_part = false;
        let headers = message.chunk.map(|chunk| {
            let mut headers = HeaderMap::new();
            match chunk {
                Chunk::Parts {
                    index,
                    count,
                    package_id,
                } => {
                    let (index, count) = (index % 6, count % 6);
                    last_part = index == count;
                    headers.insert(CHUNK_HEADER, format!("{index}/{count}").as_str());
                    if let Some(second) = package_id {
                        headers.insert(PACKAGE_ID_HEADER, if second { "q" } else { "p" });
                    }
                }
                Chunk::Raw(value) => {
                    last_part = value
                        .split_once('/')
                        .is_some_and(|(i, k)| i.parse::<u32>().ok() == k.parse().ok());
                    headers.insert(CHUNK_HEADER, value.as_str());
                }
            }
            headers
        });
        match reassembler.push(subject, headers.as_ref(), &payload) {
            Err(e) => {
                let _ = e.to_string();
            }
            Ok(Piece::Whole(whole)) if headers.is_none() => assert_eq!(whole, payload),
            Ok(Piece::Whole(whole)) => {
                assert!(last_part, "a set completed before its last part");
                assert!(whole.ends_with(&payload), "the last part is not the end");
            }
            Ok(Piece::Part) => {}
        }
        assert!(
            reassembler
                .oldest_open()
                .is_none_or(|first| first <= pushed)
        );
    }
});
