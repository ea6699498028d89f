//! TLS between our client and server with certificates made here (rcgen): a CA, server and
//! client certificates, mutual TLS, fingerprint pinning, and each way a handshake can fail.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use _socketcomm::tls::{ClientTls, ClientTlsOptions, ServerTls, ServerTlsOptions, TlsVersion};
use _socketcomm::{Client, ClientConfig, Error, Event, Mode, Server, ServerConfig};
use common::{next_event, server_with, LIMIT};

/// A CA, and certificates it signs, written as PEM files in a temporary folder.
struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own: two CAs with one name would be told apart by signature only.
        let name = format!("socketcomm test CA {}", dir.path().display());
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Pki {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues a certificate for `names` with common name `cn`; returns (cert, key) paths.
    fn issue(&self, file: &str, cn: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let cert_path = self.dir.path().join(format!("{file}.pem"));
        let key_path = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

fn tls_server(cert: &Path, key: &Path, client_ca: Option<PathBuf>) -> Server {
    let tls = ServerTls::new(&ServerTlsOptions {
        cert: Some(cert.to_owned()),
        key: Some(key.to_owned()),
        client_ca,
        ..ServerTlsOptions::default()
    })
    .unwrap();
    server_with(ServerConfig {
        mode: Mode::Echo,
        tls: Some(tls),
        tls_handshake_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    })
}

async fn connect(server: &Server, host: &str, options: ClientTlsOptions) -> Result<Client, Error> {
    let config = ClientConfig {
        tls: Some(ClientTls::new(&options)?),
        connect_timeout: LIMIT,
        ..ClientConfig::default()
    };
    Client::connect(host, server.local_addr().port(), config).await
}

/// Waits until the server has counted `n` failed handshakes (it counts them just after it
/// drops the connection, so the client may see the end first).
async fn until_tls_failures(server: &Server, n: u64) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while server.stats().tls_failures < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            server.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.stats().tls_failures, n);
}

fn tls_reason(result: Result<Client, Error>) -> String {
    match result {
        Err(Error::Tls(reason)) => reason,
        Err(other) => panic!("expected a TLS error, got {other}"),
        Ok(_) => panic!("expected a TLS error, got a connection"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_and_files_go_over_tls_verified_by_a_ca() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["localhost", "127.0.0.1"], false);
    let uploads = tempfile::tempdir().unwrap();
    let server = server_with(ServerConfig {
        mode: Mode::Echo,
        upload_dir: Some(uploads.path().to_owned()),
        tls: Some(
            ServerTls::new(&ServerTlsOptions {
                cert: Some(cert),
                key: Some(key),
                ..ServerTlsOptions::default()
            })
            .unwrap(),
        ),
        ..ServerConfig::default()
    });
    let options = ClientTlsOptions {
        ca: Some(pki.ca()),
        ..ClientTlsOptions::default()
    };
    for host in ["127.0.0.1", "localhost"] {
        let client = connect(&server, host, options.clone()).await.unwrap();
        assert!(client.is_tls());
        let big = Bytes::from(vec![7u8; 1 << 20]);
        assert_eq!(client.request(big.clone()).await.unwrap(), big);
        assert_eq!(
            client.request(Bytes::from_static(b"hi")).await.unwrap(),
            "hi"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_shows_the_client_identity_and_refuses_clients_without_a_certificate() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["127.0.0.1"], false);
    let (client_cert, client_key) = pki.issue("alice", "alice", &["alice.example"], false);
    let tls = ServerTls::new(&ServerTlsOptions {
        cert: Some(cert),
        key: Some(key),
        client_ca: Some(pki.ca()),
        ..ServerTlsOptions::default()
    })
    .unwrap();
    let server = server_with(ServerConfig {
        tls: Some(tls),
        ..ServerConfig::default()
    });
    let with_cert = ClientTlsOptions {
        ca: Some(pki.ca()),
        cert: Some(client_cert),
        key: Some(client_key),
        ..ClientTlsOptions::default()
    };
    let client = connect(&server, "127.0.0.1", with_cert).await.unwrap();
    client.send(Bytes::from_static(b"who am i")).await.unwrap();
    let Event::Connected(conn) = next_event(&server).await else {
        panic!("a connection")
    };
    let identity = conn.peer_identity().expect("a verified client certificate");
    assert_eq!(identity.subject, "CN=alice");
    assert_eq!(identity.names, ["alice.example"]);
    assert!(identity.fingerprint.starts_with("sha256:"));
    let Event::Message(message) = next_event(&server).await else {
        panic!("a message")
    };
    assert_eq!(message.conn.peer_identity(), Some(identity));

    let without = ClientTlsOptions {
        ca: Some(pki.ca()),
        ..ClientTlsOptions::default()
    };
    // TLS 1.3 reports a refused client certificate after the client's side of the handshake,
    // while the client waits for the server's hello: still a TLS error at connect.
    let reason = tls_reason(connect(&server, "127.0.0.1", without).await);
    assert!(reason.contains("requires a client certificate"), "{reason}");
    until_tls_failures(&server, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_self_signed_certificate_is_trusted_by_its_pinned_fingerprint_only() {
    let tls = ServerTls::new(&ServerTlsOptions {
        self_signed: Some(vec!["localhost".into(), "127.0.0.1".into()]),
        ..ServerTlsOptions::default()
    })
    .unwrap();
    let fingerprint = tls.fingerprint().to_owned();
    assert!(fingerprint.starts_with("sha256:") && fingerprint.len() == 7 + 64);
    let server = server_with(ServerConfig {
        mode: Mode::Echo,
        tls: Some(tls),
        ..ServerConfig::default()
    });
    // Pinned, in the colon-separated upper-case form openssl prints too.
    let openssl_form = fingerprint.as_bytes()[7..]
        .chunks(2)
        .map(|pair| std::str::from_utf8(pair).unwrap().to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    for pin in [fingerprint.clone(), format!("SHA256:{openssl_form}")] {
        let options = ClientTlsOptions {
            fingerprint: Some(pin),
            ..ClientTlsOptions::default()
        };
        let client = connect(&server, "127.0.0.1", options).await.unwrap();
        assert_eq!(
            client.request(Bytes::from_static(b"pinned")).await.unwrap(),
            "pinned"
        );
    }
    let wrong = ClientTlsOptions {
        fingerprint: Some(format!("sha256:{}", "ab".repeat(32))),
        ..ClientTlsOptions::default()
    };
    let reason = tls_reason(connect(&server, "127.0.0.1", wrong).await);
    assert!(
        reason.contains("fingerprint mismatch") && reason.contains(&fingerprint),
        "{reason}"
    );
    // Not pinned and not signed by a trusted CA: an unknown issuer.
    let other_ca = Pki::new();
    let unpinned = ClientTlsOptions {
        ca: Some(other_ca.ca()),
        ..ClientTlsOptions::default()
    };
    let reason = tls_reason(connect(&server, "127.0.0.1", unpinned).await);
    assert!(reason.contains("unknown issuer"), "{reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_name_an_unknown_issuer_and_an_expired_certificate_are_told_apart() {
    let pki = Pki::new();
    let trusted = ClientTlsOptions {
        ca: Some(pki.ca()),
        ..ClientTlsOptions::default()
    };

    let (cert, key) = pki.issue("other-name", "server", &["example.org"], false);
    let server = tls_server(&cert, &key, None);
    let reason = tls_reason(connect(&server, "127.0.0.1", trusted.clone()).await);
    assert!(reason.contains("not valid for the name"), "{reason}");
    // The name it was issued for works, by setting it explicitly.
    let named = ClientTlsOptions {
        server_name: Some("example.org".into()),
        ..trusted.clone()
    };
    connect(&server, "127.0.0.1", named).await.unwrap();

    let (cert, key) = pki.issue("expired", "server", &["127.0.0.1"], true);
    let server = tls_server(&cert, &key, None);
    let reason = tls_reason(connect(&server, "127.0.0.1", trusted.clone()).await);
    assert!(reason.contains("expired"), "{reason}");

    let stranger = Pki::new();
    let (cert, key) = stranger.issue("stranger", "server", &["127.0.0.1"], false);
    let server = tls_server(&cert, &key, None);
    let reason = tls_reason(connect(&server, "127.0.0.1", trusted).await);
    assert!(reason.contains("unknown issuer"), "{reason}");
    // The server goes on serving after each failed handshake.
    let good = ClientTlsOptions {
        ca: Some(stranger.ca()),
        ..ClientTlsOptions::default()
    };
    connect(&server, "127.0.0.1", good).await.unwrap();
    until_tls_failures(&server, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_and_tls_at_the_wrong_port_say_which_side_expected_tls() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["127.0.0.1"], false);
    let tls_port = tls_server(&cert, &key, None);

    // A plaintext socketcomm client at the TLS port.
    let port = tls_port.local_addr().port();
    let Err(Error::Tls(reason)) = Client::connect("127.0.0.1", port, ClientConfig::default()).await
    else {
        panic!("a plaintext client cannot use a TLS server")
    };
    assert!(reason.contains("requires TLS"), "{reason}");
    // A plain socket gets a line of text.
    let mut plain = TcpStream::connect(tls_port.local_addr()).await.unwrap();
    plain.write_all(b"Hello World").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(LIMIT, plain.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("this server requires TLS"), "{answer}");

    // A TLS client at a plaintext port.
    let plaintext = server_with(ServerConfig {
        mode: Mode::Echo,
        ..ServerConfig::default()
    });
    let options = ClientTlsOptions {
        ca: Some(pki.ca()),
        ..ClientTlsOptions::default()
    };
    let reason = tls_reason(connect(&plaintext, "127.0.0.1", options.clone()).await);
    assert!(reason.contains("may not serve TLS"), "{reason}");
    let Event::Connected(_) = next_event(&plaintext).await else {
        panic!("a connection")
    };
    let Event::Disconnected { reason, .. } = next_event(&plaintext).await else {
        panic!("its end")
    };
    assert!(reason.reason.contains("serves plaintext"), "{reason}");
    // Both servers keep serving.
    connect(&tls_port, "127.0.0.1", options).await.unwrap();
    let client = common::client(&plaintext).await;
    assert_eq!(
        client.request(Bytes::from_static(b"ok")).await.unwrap(),
        "ok"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_finishes_the_handshake_is_dropped() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["127.0.0.1"], false);
    let server = tls_server(&cert, &key, None);
    let mut silent = TcpStream::connect(server.local_addr()).await.unwrap();
    // A ClientHello's first bytes, then nothing.
    silent.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(LIMIT, silent.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the server never dropped the connection");
    assert!(started.elapsed() >= Duration::from_millis(400));
    until_tls_failures(&server, 1).await;
}

#[test]
fn missing_or_wrong_files_fail_at_start_up_naming_the_path() {
    let pki = Pki::new();
    let (cert, key) = pki.issue("server", "server", &["127.0.0.1"], false);
    let missing = pki.dir.path().join("missing.key");
    let error = ServerTls::new(&ServerTlsOptions {
        cert: Some(cert.clone()),
        key: Some(missing),
        ..ServerTlsOptions::default()
    })
    .unwrap_err();
    let Error::Io {
        source, context, ..
    } = &error
    else {
        panic!("expected an I/O error, got {error}")
    };
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    assert!(
        context.contains("tls_key") && context.contains("missing.key"),
        "{context}"
    );

    // A certificate in place of the key, and a key in place of the certificate.
    let error = ServerTls::new(&ServerTlsOptions {
        cert: Some(cert.clone()),
        key: Some(cert.clone()),
        ..ServerTlsOptions::default()
    })
    .unwrap_err();
    assert!(error.to_string().contains("server.pem"), "{error}");
    let error = ServerTls::new(&ServerTlsOptions {
        cert: Some(key.clone()),
        key: Some(key),
        ..ServerTlsOptions::default()
    })
    .unwrap_err();
    assert!(error.to_string().contains("no PEM certificate"), "{error}");

    let error = ClientTls::new(&ClientTlsOptions {
        fingerprint: Some("sha256:1234".into()),
        ..ClientTlsOptions::default()
    })
    .unwrap_err();
    assert!(error.to_string().contains("tls_fingerprint"), "{error}");
    assert_eq!(TlsVersion::parse("1.2").unwrap(), TlsVersion::V1_2);
    assert!(TlsVersion::parse("1.1").is_err());
}
