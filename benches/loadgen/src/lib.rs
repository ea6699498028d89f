//! Shared by the benchmark's binaries: the framed protocol's few constants, and CPU time from
//! `/proc` (the figure that ranks servers on a machine whose load generator takes a core).

use std::time::Duration;

pub const MAGIC: [u8; 4] = [0x89, b'S', b'C', b'M'];
pub const DATA: u8 = 0x01;
pub const REQUEST: u8 = 0x02;
pub const REPLY: u8 = 0x03;
pub const PING: u8 = 0x20;
pub const PONG: u8 = 0x21;

/// A socketcomm hello announcing version 1 and a 16 MiB frame limit.
pub fn hello() -> [u8; 12] {
    let mut hello = [0u8; 12];
    hello[..4].copy_from_slice(&MAGIC);
    hello[4] = 1;
    hello[5] = 1;
    hello[8..].copy_from_slice(&(16u32 << 20).to_be_bytes());
    hello
}

/// Asks the kernel for SIGTERM once the parent process is gone, so that a peer whose
/// benchmark was killed does not serve its port for ever.
pub fn stop_with_parent() {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and no pointers.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
    }
    // SAFETY: getppid has no preconditions. Reparented already: the parent died before.
    if unsafe { libc::getppid() } == 1 {
        std::process::exit(0);
    }
}

/// User plus system CPU time of a process (`self` or a PID), from `/proc/<pid>/stat`.
pub fn cpu_time(pid: &str) -> Option<Duration> {
    cpu_times(pid).map(|(user, system)| user + system)
}

/// User and system (kernel) CPU time of a process (`self` or a PID), from `/proc/<pid>/stat`.
pub fn cpu_times(pid: &str) -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields counted here come after its closing paren.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let seconds = |t: u64| Duration::from_secs_f64(t as f64 / ticks);
    Some((seconds(utime), seconds(stime)))
}

/// A TLS client that accepts any server certificate: the benchmark's peers run on loopback
/// with certificates made for the run, and what is measured is the encryption, not the trust.
pub fn tls_connector() -> tokio_rustls::TlsConnector {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
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
            rustls::crypto::verify_tls13_signature(
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

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}
