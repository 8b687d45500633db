//! Fuzzes the decoder of a snapshot package's `COPY` text (`sluice_proto::values::copy`): it must
//! never panic, whatever the text and whatever the package claims (the loader reads it from the
//! stream).
//!
//! Input layout: the first byte gives the number of columns (1 to 4) and the stated row count's
//! low bits; the next bytes pick each column's category and whether it is an array; the rest is
//! the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_proto::v1;
use sluice_proto::values::TypeCategory;

const CATEGORIES: [TypeCategory; 15] = TypeCategory::ALL;

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let columns = usize::from(head & 3) + 1;
    if rest.len() < columns {
        return;
    }
    let (picks, text) = rest.split_at(columns);
    let relation = v1::Relation {
        columns: picks
            .iter()
            .enumerate()
            .map(|(i, &pick)| v1::Column {
                name: format!("c{i}"),
                text_category: CATEGORIES[usize::from(pick & 0x7f) % CATEGORIES.len()].to_wire()
                    as i32,
                array_delimiter: if pick & 0x80 != 0 { u32::from(b',') } else { 0 },
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut package = v1::Package {
        kind: v1::Kind::Snapshot as i32,
        relation: Some(relation),
        copy_text: bytes::Bytes::copy_from_slice(text),
        copy_rows: u32::from(head >> 2),
        ..Default::default()
    };
    let _ = sluice_proto::values::copy::check_lines(text, columns);
    if let Err(e) = sluice_proto::values::copy::materialize(&mut package) {
        let _ = e.to_string();
    }
});
