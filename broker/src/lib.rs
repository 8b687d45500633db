//! The contract both sluice binaries share: configuration, JetStream topology
//! (stream, subjects, dedup IDs) and publishing with bounded in-flight acks.

pub mod chunk;
pub mod config;
pub mod connect;
pub mod publish;
pub mod supervise;
pub mod table;
pub mod tls;

pub use table::TableName;
pub mod telemetry;
pub mod topology;

/// Renders an error with its whole `source()` chain on one line
/// (`outer: inner: root`), for log fields and exit messages.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
