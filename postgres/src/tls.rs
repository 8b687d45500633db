//! TLS for both Postgres connections (replication and SQL), on rustls (ring
//! provider), following libpq's `sslmode`, `sslrootcert`, `sslcert` and
//! `sslkey`.
//!
//! Postgres negotiates TLS in-band: the client sends an `SSLRequest` and the
//! server answers one byte, `S` (go ahead with the handshake) or `N` (no TLS).
//! See "SSL Session Encryption" in
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-SSL>.
//! Exactly one byte is read before the handshake, so nothing a
//! man-in-the-middle injects in plain text can be taken for TLS-protected data
//! (CVE-2021-23222).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    CryptoProvider, ring, verify_tls12_signature, verify_tls13_signature,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `sslmode=require` (or stricter) and the server answered `N` to SSLRequest.
    #[error("the server does not support TLS")]
    NotSupported,
    /// The host is not a valid TLS server name (needed for verify-full).
    #[error("invalid server name for TLS")]
    InvalidServerName,
    /// The root certificates could not be loaded.
    #[error("cannot load root certificates from {path}")]
    RootCerts {
        /// The file or store that failed.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The client certificate or its key could not be loaded.
    #[error("cannot load the client certificate or key from {path}")]
    ClientCert {
        /// The file that failed.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Building the TLS client configuration failed.
    #[error("TLS configuration")]
    Config(#[source] tokio_rustls::rustls::Error),
    /// The TLS handshake failed (including certificate verification, whose
    /// details are in the source chain).
    #[error("TLS handshake")]
    Io(#[source] io::Error),
}

pub use sluice_broker::tls::is_certificate_failure;

/// How to use TLS, following libpq's `sslmode` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS if the server supports it, else plain TCP; the certificate is not
    /// verified (libpq's default; protects against passive eavesdropping only).
    #[default]
    Prefer,
    /// TLS or fail; the certificate is not verified.
    Require,
    /// TLS or fail; the certificate chain must lead to a trusted root and name
    /// the host we connected to.
    VerifyFull,
}

/// TLS settings of a replication connection.
///
/// `tokio_postgres::Config` only knows `sslmode` disable/prefer/require and
/// has no `sslrootcert`, so [`super::ReplicationClient::connect`] derives
/// `TlsOptions` from the config and [`super::ReplicationClient::connect_with_tls`]
/// takes them explicitly (for `verify-full`).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// The `sslmode`.
    pub mode: SslMode,
    /// PEM file of the roots to trust for `VerifyFull` (libpq's `sslrootcert`);
    /// `None` uses the operating system's trust store.
    pub root_cert: Option<PathBuf>,
    /// PEM client certificate (chain) and its private key, for servers that
    /// authenticate the client by certificate (libpq's `sslcert`, `sslkey`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl From<tokio_postgres::config::SslMode> for SslMode {
    fn from(mode: tokio_postgres::config::SslMode) -> Self {
        match mode {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            // Prefer, and any mode added later: fall back to the libpq default.
            _ => SslMode::Prefer,
        }
    }
}

/// The rustls client configuration for `options`.
pub fn client_config(options: &TlsOptions) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match options.mode {
        SslMode::VerifyFull => {
            let mut roots = RootCertStore::empty();
            match &options.root_cert {
                Some(path) => {
                    let root_err = |source: std::io::Error| TlsError::RootCerts {
                        path: path.display().to_string(),
                        source,
                    };
                    for cert in CertificateDer::pem_file_iter(path)
                        .map_err(|e| root_err(std::io::Error::other(e)))?
                    {
                        let cert = cert.map_err(|e| root_err(std::io::Error::other(e)))?;
                        roots
                            .add(cert)
                            .map_err(|e| root_err(std::io::Error::other(e)))?;
                    }
                }
                None => {
                    let loaded = rustls_native_certs::load_native_certs();
                    if loaded.certs.is_empty() {
                        return Err(TlsError::RootCerts {
                            path: "the system trust store".to_owned(),
                            source: std::io::Error::other(format!("{:?}", loaded.errors)),
                        });
                    }
                    roots.add_parsable_certificates(loaded.certs);
                }
            }
            builder.with_root_certificates(roots)
        }
        SslMode::Prefer | SslMode::Require | SslMode::Disable => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCertificateVerification(provider))),
    };
    let config = match &options.client_cert {
        Some((cert, key)) => {
            let (chain, key) = load_client_cert(cert, key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(TlsError::Config)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn load_client_cert(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let failed = |path: &Path| {
        let path = path.display().to_string();
        move |e: tokio_rustls::rustls::pki_types::pem::Error| TlsError::ClientCert {
            path: path.clone(),
            source: io::Error::other(e),
        }
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(failed(cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(failed(cert))?;
    if chain.is_empty() {
        return Err(TlsError::ClientCert {
            path: cert.display().to_string(),
            source: io::Error::other("no certificate in the file"),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(failed(key))?;
    Ok((chain, key))
}

/// The TLS server name of `host` (a DNS name or an IP address).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::InvalidServerName)
}

/// `sslmode=prefer|require`: encrypt, but accept any certificate (as libpq
/// does). The handshake signatures are still checked, so the session key is
/// bound to the presented certificate.
#[derive(Debug)]
struct NoCertificateVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
