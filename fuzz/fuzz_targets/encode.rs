//! Fuzzes the loader's ClickHouse row encoder (`sluice_loader::clickhouse`): a package as anyone
//! who can publish on the stream's subjects could send it, typed by its own relation, must encode
//! or fail with an error, never panic, loop without bound or allocate without bound.
//!
//! Input layout: the bytes are a protobuf `Package` (prost checks the wire format; what it holds,
//! column types, array dimensions, values of the wrong kind, is up to the fuzzer).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_loader::clickhouse::{CurrentRows, InsertBuilder, TargetTable, ToastRequest};
use sluice_proto::Message as _;
use sluice_proto::v1;

fuzz_target!(|data: &[u8]| {
    let Ok(package) = v1::Package::decode(data) else {
        return;
    };
    let Some(relation) = &package.relation else {
        return;
    };
    let Ok(target) = TargetTable::from_relation("db", "s", "t", relation) else {
        return;
    };
    let mut toast = ToastRequest::default();
    let _ = toast.add_package(&target, &package);
    let mut builder = InsertBuilder::new(&target);
    if let Err(e) = builder.push_package(&package, &CurrentRows::default()) {
        let _ = e.to_string();
    }
});
