//! TLS errors shared by every client of sluice (NATS here, Postgres in
//! `sluice-postgres`, ClickHouse in the loader): which ones a retry cannot fix.

use std::io;

/// Whether `error` or one of its causes is a certificate that a retry cannot
/// fix: rustls refusing the server's certificate (unknown issuer, wrong name,
/// expired), or the server refusing ours, or its absence, with a TLS alert
/// (certificate required, bad or unknown certificate, unknown CA, access
/// denied). Works for any client on rustls (Postgres here, ClickHouse's HTTPS
/// in the loader, NATS).
pub fn is_certificate_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    use tokio_rustls::rustls::{self, AlertDescription as Alert};
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.downcast_ref::<rustls::Error>().is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::AlertReceived(
                        Alert::CertificateRequired
                            | Alert::BadCertificate
                            | Alert::UnsupportedCertificate
                            | Alert::CertificateRevoked
                            | Alert::CertificateExpired
                            | Alert::CertificateUnknown
                            | Alert::UnknownCA
                            | Alert::AccessDenied
                    )
            )
        }) {
            return true;
        }
        // An `io::Error`'s `source()` skips the error it wraps (TLS layers
        // wrap rustls' errors, sometimes twice): descend into it instead.
        cause = match error
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    false
}
