//! TLS with rustls: server and client configurations from PEM files, a self-signed certificate
//! made in memory with its SHA-256 fingerprint, fingerprint pinning, client certificates
//! (mutual TLS), the identity of a verified peer, and handshake failures in words.
//!
//! NOTE on the crypto provider: `ring`. It builds with a C compiler alone, where `aws-lc-rs`
//! (rustls' default) also needs CMake and minutes of build time in every `pip install .`; both
//! provide the TLS 1.3 and 1.2 suites and key types used here, and `ring` also gives the SHA-256
//! of fingerprints, so one provider serves everything.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::{Error, Result};

/// The lowest TLS version a side accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    V1_2,
    /// TLS 1.3 only (the default).
    #[default]
    V1_3,
}

impl TlsVersion {
    /// # Errors
    /// [`Error::InvalidOption`] for anything but "1.2" or "1.3".
    pub fn parse(text: &str) -> Result<TlsVersion> {
        match text {
            "1.2" => Ok(TlsVersion::V1_2),
            "1.3" => Ok(TlsVersion::V1_3),
            other => Err(Error::invalid(
                "tls_min_version",
                format!("{other:?} is not one of '1.2', '1.3'"),
            )),
        }
    }

    fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        static TLS12_UP: [&rustls::SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        match self {
            TlsVersion::V1_3 => &TLS13_ONLY,
            TlsVersion::V1_2 => &TLS12_UP,
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SHA-256 fingerprint of a DER certificate, as `sha256:` and 64 hex digits.
pub fn fingerprint(cert: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert);
    digest
        .as_ref()
        .iter()
        .fold(String::from("sha256:"), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// Reads a pin as `sha256:` and 64 hex digits, with or without colons between bytes, in either
/// case (the forms `openssl x509 -fingerprint` and this library print).
fn parse_fingerprint(pin: &str) -> Result<String> {
    let digits: String = pin
        .trim()
        .strip_prefix("sha256:")
        .or_else(|| pin.trim().strip_prefix("SHA256:"))
        .unwrap_or(pin.trim())
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::invalid(
            "tls_fingerprint",
            format!("{pin:?} is not a SHA-256 fingerprint (sha256: and 64 hex digits)"),
        ));
    }
    Ok(format!("sha256:{digits}"))
}

fn read_certs(option: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<std::result::Result<_, _>>())
        .map_err(|e| pem_error(option, path, e))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{option} {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

fn read_key(option: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(option, path, e))
}

fn pem_error(option: &'static str, path: &Path, e: rustls::pki_types::pem::Error) -> Error {
    use rustls::pki_types::pem::Error as Pem;
    match e {
        Pem::Io(source) => Error::io(format!("cannot read {option} {}", path.display()), source),
        Pem::NoItemsFound => Error::Tls(format!(
            "{option} {} holds no PEM item of the expected kind",
            path.display()
        )),
        other => Error::Tls(format!(
            "{option} {} is not valid PEM: {other}",
            path.display()
        )),
    }
}

fn roots_from(option: &'static str, path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(option, path)? {
        roots
            .add(cert)
            .map_err(|e| Error::Tls(format!("{option} {}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// What a server's TLS is made of.
#[derive(Debug, Clone, Default)]
pub struct ServerTlsOptions {
    /// The certificate chain (leaf first) and its private key, PEM files. `None` for both with
    /// `self_signed`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Make a certificate in memory for these names instead (development only: clients must pin
    /// its fingerprint).
    pub self_signed: Option<Vec<String>>,
    /// Require client certificates signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
    pub min_version: TlsVersion,
}

/// A server's TLS configuration, ready to accept connections.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    fingerprint: String,
    mutual: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("fingerprint", &self.fingerprint)
            .field("mutual", &self.mutual)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// # Errors
    /// [`Error::Io`] naming the path of a file that cannot be read, [`Error::Tls`] for files
    /// that hold no certificate or key, or a key that does not match the certificate,
    /// [`Error::InvalidOption`] for a certificate given without a key or the other way round.
    pub fn new(options: &ServerTlsOptions) -> Result<ServerTls> {
        let (chain, key) = match (&options.self_signed, &options.cert, &options.key) {
            (Some(names), None, None) => self_signed(names)?,
            (None, Some(cert), Some(key)) => {
                (read_certs("tls_cert", cert)?, read_key("tls_key", key)?)
            }
            (Some(_), _, _) => {
                return Err(Error::invalid(
                    "tls_self_signed",
                    "a self-signed certificate is made in memory: give no tls_cert or tls_key",
                ))
            }
            (None, _, _) => {
                return Err(Error::invalid(
                    "tls_cert",
                    "TLS needs both a certificate chain (tls_cert) and its key (tls_key), or \
                     a self-signed certificate",
                ))
            }
        };
        let fingerprint = fingerprint(&chain[0]);
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(options.min_version.versions())
            .map_err(|e| Error::Tls(e.to_string()))?;
        let builder = match &options.client_ca {
            Some(ca) => {
                let roots = Arc::new(roots_from("tls_client_ca", ca)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| Error::Tls(format!("tls_client_ca: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key).map_err(|e| {
            Error::Tls(format!(
                "the TLS certificate and key do not go together: {e}"
            ))
        })?;
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            fingerprint,
            mutual: options.client_ca.is_some(),
        })
    }

    /// The SHA-256 fingerprint of the server's certificate, for clients to pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Whether clients must present a certificate.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    pub(crate) fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }
}

fn self_signed(names: &[String]) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let made = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| Error::Tls(format!("cannot make a self-signed certificate: {e}")))?;
    let key = PrivateKeyDer::try_from(made.signing_key.serialize_der())
        .map_err(|e| Error::Tls(format!("cannot use the generated key: {e}")))?;
    Ok((vec![made.cert.der().clone()], key))
}

/// What a client's TLS is made of.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsOptions {
    /// Trust the server's certificate if this CA (PEM) signed it; `None` with no `fingerprint`:
    /// the system's trusted roots.
    pub ca: Option<PathBuf>,
    /// Trust exactly the certificate with this SHA-256 fingerprint (for self-signed servers);
    /// chain and name are not checked then.
    pub fingerprint: Option<String>,
    /// A client certificate chain and key (PEM) for servers that require one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the server's certificate must be valid for; by default the host connected to.
    pub server_name: Option<String>,
    pub min_version: TlsVersion,
}

/// A client's TLS configuration.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// # Errors
    /// [`Error::Io`] naming a file that cannot be read, [`Error::Tls`] for unusable contents,
    /// [`Error::InvalidOption`] for a malformed fingerprint or a certificate without its key.
    pub fn new(options: &ClientTlsOptions) -> Result<ClientTls> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(options.min_version.versions())
            .map_err(|e| Error::Tls(e.to_string()))?;
        let builder = match (&options.fingerprint, &options.ca) {
            (Some(pin), _) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
                    fingerprint: parse_fingerprint(pin)?,
                    provider: provider(),
                })),
            (None, Some(ca)) => builder.with_root_certificates(roots_from("tls_ca", ca)?),
            (None, None) => builder.with_root_certificates(system_roots()?),
        };
        let config = match (&options.cert, &options.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(
                    read_certs("tls_client_cert", cert)?,
                    read_key("tls_client_key", key)?,
                )
                .map_err(|e| {
                    Error::Tls(format!(
                        "the client certificate and key do not go together: {e}"
                    ))
                })?,
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(Error::invalid(
                    "tls_client_cert",
                    "a client certificate needs its key (tls_client_cert and tls_client_key)",
                ))
            }
        };
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name: options.server_name.clone(),
        })
    }

    pub(crate) fn connector(&self) -> &tokio_rustls::TlsConnector {
        &self.connector
    }

    /// The name to verify the server's certificate against, when connecting to `host`.
    ///
    /// # Errors
    /// [`Error::InvalidOption`] when it is neither a DNS name nor an IP address.
    pub(crate) fn server_name(&self, host: &str) -> Result<ServerName<'static>> {
        let name = self.server_name.as_deref().unwrap_or(host);
        ServerName::try_from(name.to_owned()).map_err(|_| {
            Error::invalid(
                "tls_server_name",
                format!("{name:?} is neither a DNS name nor an IP address"),
            )
        })
    }
}

fn system_roots() -> Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(Error::Tls(
            "no trusted root certificates were found on this system; pass tls_ca=... (the CA \
             that signed the server's certificate) or pin its fingerprint"
                .into(),
        ));
    }
    Ok(roots)
}

/// Trusts exactly one certificate, by its SHA-256 fingerprint, and still checks that the server
/// holds its key (the handshake signatures).
#[derive(Debug)]
struct PinnedCertificate {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

/// A pinned fingerprint that does not match, as the cause of a TLS failure.
#[derive(Debug)]
struct FingerprintMismatch {
    pinned: String,
    presented: String,
}

impl std::fmt::Display for FingerprintMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server's certificate has fingerprint {}, not the pinned {}",
            self.presented, self.pinned
        )
    }
}

impl std::error::Error for FingerprintMismatch {}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint(end_entity);
        if presented == self.fingerprint {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(FingerprintMismatch {
                pinned: self.fingerprint.clone(),
                presented,
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Who the peer is, from the certificate it presented and that was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The certificate's subject, as `CN=alice, O=Example`.
    pub subject: String,
    /// Its subject alternative names: DNS names, IP addresses, e-mail addresses, URIs.
    pub names: Vec<String>,
    pub fingerprint: String,
}

impl PeerIdentity {
    pub(crate) fn from_der(der: &[u8]) -> PeerIdentity {
        use x509_parser::extensions::GeneralName;
        let fingerprint = fingerprint(der);
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            // rustls verified it, so this does not happen; the fingerprint still identifies it.
            return PeerIdentity {
                subject: String::new(),
                names: Vec::new(),
                fingerprint,
            };
        };
        let names = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                        GeneralName::RFC822Name(mail) => Some((*mail).to_owned()),
                        GeneralName::URI(uri) => Some((*uri).to_owned()),
                        GeneralName::IPAddress(bytes) => ip_text(bytes),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        PeerIdentity {
            subject: cert.subject().to_string(),
            names,
            fingerprint,
        }
    }
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).to_string()),
        _ => None,
    }
}

/// Whether an I/O error on a TLS stream is a TLS failure (an alert from the peer, say).
pub(crate) fn is_tls_failure(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
}

/// A failed handshake in words: which check failed, and what to do about it.
pub(crate) fn handshake_error(e: &io::Error, server: bool) -> String {
    let peer = if server { "client" } else { "server" };
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset if !server => {
                "the server closed the connection during the TLS handshake: it may not serve \
                 TLS (a plaintext socketcomm server drops TLS clients), or it refused this \
                 client's certificate"
                    .to_owned()
            }
            _ => format!("the TLS handshake failed: {e}"),
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => describe_certificate(cert, peer),
        rustls::Error::InvalidMessage(_) => {
            format!("the {peer} does not speak TLS (it sent something that is not a TLS record)")
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired) if !server => {
            "the server requires a client certificate: pass tls_client_cert and tls_client_key \
             (--tls-client-cert, --tls-client-key)"
                .to_owned()
        }
        rustls::Error::AlertReceived(alert) => format!(
            "the {peer} refused the TLS handshake (alert: {alert:?}){}",
            if server {
                ""
            } else {
                "; if it requires a client certificate, pass one (tls_client_cert, \
                 tls_client_key)"
            }
        ),
        rustls::Error::NoCertificatesPresented => {
            "the client presented no certificate, and this server requires one (tls_client_ca)"
                .to_owned()
        }
        other => format!("the TLS handshake failed: {other}"),
    }
}

fn describe_certificate(error: &CertificateError, peer: &str) -> String {
    match error {
        CertificateError::UnknownIssuer => format!(
            "the {peer}'s certificate is signed by an unknown issuer: trust the CA that signed \
             it (tls_ca / --tls-ca), or pin its fingerprint"
        ),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "the {peer}'s certificate is not valid for the name connected to ({error}); \
                 connect with the name it was issued for, or set tls_server_name"
            )
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            format!("the {peer}'s certificate has expired ({error})")
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            format!("the {peer}'s certificate is not valid yet ({error})")
        }
        CertificateError::Other(other) => match other.0.downcast_ref::<FingerprintMismatch>() {
            Some(mismatch) => format!("fingerprint mismatch: {mismatch}"),
            None => format!("the {peer}'s certificate was refused: {other}"),
        },
        other => format!("the {peer}'s certificate was refused: {other}"),
    }
}
