//! `socketcomm.ServerTls`, `socketcomm.ClientTls` and `socketcomm.PeerIdentity`: TLS settings
//! built (and their files read) at construction, so a missing key fails where it is named.

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::tls::{
    ClientTls, ClientTlsOptions, PeerIdentity, ServerTls, ServerTlsOptions, TlsVersion,
};

/// A server's TLS settings; see the stub.
#[pyclass(frozen, module = "socketcomm._socketcomm", name = "ServerTls")]
pub(crate) struct PyServerTls {
    pub(crate) core: ServerTls,
}

#[pymethods]
impl PyServerTls {
    #[new]
    #[pyo3(signature = (cert, key, *, client_ca = None, min_version = "1.3"))]
    fn new(
        py: Python<'_>,
        cert: PathBuf,
        key: PathBuf,
        client_ca: Option<PathBuf>,
        min_version: &str,
    ) -> PyResult<PyServerTls> {
        let options = ServerTlsOptions {
            cert: Some(cert),
            key: Some(key),
            client_ca,
            min_version: TlsVersion::parse(min_version)?,
            ..ServerTlsOptions::default()
        };
        let core = py.detach(|| ServerTls::new(&options))?;
        Ok(PyServerTls { core })
    }

    /// A certificate made in memory for `names`, for development: clients pin its fingerprint.
    #[staticmethod]
    #[pyo3(signature = (
        names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()],
        *,
        client_ca = None,
        min_version = "1.3",
    ))]
    fn self_signed(
        py: Python<'_>,
        names: Vec<String>,
        client_ca: Option<PathBuf>,
        min_version: &str,
    ) -> PyResult<PyServerTls> {
        let options = ServerTlsOptions {
            self_signed: Some(names),
            client_ca,
            min_version: TlsVersion::parse(min_version)?,
            ..ServerTlsOptions::default()
        };
        let core = py.detach(|| ServerTls::new(&options))?;
        Ok(PyServerTls { core })
    }

    /// The SHA-256 fingerprint of the server's certificate (`sha256:` and 64 hex digits).
    #[getter]
    fn fingerprint(&self) -> &str {
        self.core.fingerprint()
    }

    /// Whether clients must present a certificate (`client_ca` was given).
    #[getter]
    fn mutual(&self) -> bool {
        self.core.is_mutual()
    }

    fn __repr__(&self) -> String {
        format!(
            "ServerTls(fingerprint='{}', mutual={})",
            self.core.fingerprint(),
            if self.core.is_mutual() {
                "True"
            } else {
                "False"
            }
        )
    }
}

/// A client's TLS settings; see the stub.
#[pyclass(frozen, module = "socketcomm._socketcomm", name = "ClientTls")]
pub(crate) struct PyClientTls {
    pub(crate) core: ClientTls,
}

#[pymethods]
impl PyClientTls {
    #[new]
    #[pyo3(signature = (
        *,
        ca = None,
        fingerprint = None,
        cert = None,
        key = None,
        server_name = None,
        min_version = "1.3",
    ))]
    fn new(
        py: Python<'_>,
        ca: Option<PathBuf>,
        fingerprint: Option<String>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        server_name: Option<String>,
        min_version: &str,
    ) -> PyResult<PyClientTls> {
        let options = ClientTlsOptions {
            ca,
            fingerprint,
            cert,
            key,
            server_name,
            min_version: TlsVersion::parse(min_version)?,
        };
        let core = py.detach(|| ClientTls::new(&options))?;
        Ok(PyClientTls { core })
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.core)
    }
}

/// Who a client is, from the certificate it presented to a mutual-TLS server.
#[pyclass(frozen, module = "socketcomm._socketcomm", name = "PeerIdentity")]
pub(crate) struct PyPeerIdentity {
    #[pyo3(get)]
    subject: String,
    #[pyo3(get)]
    names: Vec<String>,
    #[pyo3(get)]
    fingerprint: String,
}

impl From<&PeerIdentity> for PyPeerIdentity {
    fn from(identity: &PeerIdentity) -> PyPeerIdentity {
        PyPeerIdentity {
            subject: identity.subject.clone(),
            names: identity.names.clone(),
            fingerprint: identity.fingerprint.clone(),
        }
    }
}

#[pymethods]
impl PyPeerIdentity {
    fn __repr__(&self) -> String {
        format!(
            "PeerIdentity(subject={:?}, names={:?}, fingerprint='{}')",
            self.subject, self.names, self.fingerprint
        )
    }
}

/// The identity an event shows: `None` unless the server verified a client certificate.
pub(crate) fn identity_of(conn: &crate::server::Connection) -> Option<PyPeerIdentity> {
    conn.peer_identity().map(PyPeerIdentity::from)
}
