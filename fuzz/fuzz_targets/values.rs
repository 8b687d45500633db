//! Fuzzes the decoder of Postgres' text output (`sluice_proto::values`): it must never panic,
//! whatever the text (pgoutput sends column values as text from the source database, so a value is
//! as hostile as the data in it).
//!
//! Input layout: the first byte picks the type category and whether the value is an array of it;
//! the rest, read as UTF-8 (lossily), is the value's text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_proto::values::{TypeCategory, TypeInfo};
use sluice_proto::values::decode_text;

const CATEGORIES: [TypeCategory; 15] = TypeCategory::ALL;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let category = CATEGORIES[usize::from(pick & 0x7f) % CATEGORIES.len()];
    let scalar = TypeInfo::scalar(1, "t", category);
    let ty = if pick & 0x80 != 0 {
        TypeInfo::array_of(2, "_t", &scalar)
    } else {
        scalar
    };
    let text = String::from_utf8_lossy(rest);
    if let Err(e) = decode_text(&ty, &text) {
        // Error messages are formatted from the input too.
        let _ = e.to_string();
    }
});
