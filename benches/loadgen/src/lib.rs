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

/// The CPU time that this process and the servers used over a measured window.
pub struct CpuWindow {
    server_pids: Vec<String>,
    own: Option<Duration>,
    servers: Option<(Duration, Duration)>,
}

/// What a [`CpuWindow`] measured, in seconds (`None` where `/proc` could not tell).
pub struct CpuUsed {
    pub own: Option<f64>,
    /// User plus system time of the servers.
    pub server: Option<f64>,
    /// The kernel's part of `server`: the system calls of each message, which every server
    /// pays, bound how little CPU per message any of them can use.
    pub server_system: Option<f64>,
}

impl CpuWindow {
    /// Starts measuring now.
    pub fn start(server_pids: &[String]) -> CpuWindow {
        CpuWindow {
            servers: servers_times(server_pids),
            own: cpu_times("self").map(|(user, system)| user + system),
            server_pids: server_pids.to_vec(),
        }
    }

    /// What was used since the start.
    pub fn used(&self) -> CpuUsed {
        let seconds = |after: Duration, before: Duration| (after - before).as_secs_f64();
        let own = cpu_times("self").map(|(user, system)| user + system);
        let servers = servers_times(&self.server_pids);
        let both = servers.zip(self.servers);
        CpuUsed {
            own: own.zip(self.own).map(|(a, b)| seconds(a, b)),
            server: both.map(|(a, b)| seconds(a.0 + a.1, b.0 + b.1)),
            server_system: both.map(|(a, b)| seconds(a.1, b.1)),
        }
    }
}

/// The servers' user and system time together; `None` without servers.
fn servers_times(pids: &[String]) -> Option<(Duration, Duration)> {
    if pids.is_empty() {
        return None;
    }
    pids.iter()
        .try_fold((Duration::ZERO, Duration::ZERO), |sum, pid| {
            cpu_times(pid).map(|t| (sum.0 + t.0, sum.1 + t.1))
        })
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
