//! The limit: a minimal tokio server that speaks socketcomm's framed protocol and echoes each
//! frame (a REQUEST comes back as a REPLY), with nothing else. `--sink` reads and discards;
//! `--raw` speaks no protocol and writes back whatever it reads (the limit for plain sockets);
//! `--tls` serves TLS 1.3 with tokio-rustls (the limit for TLS), with the certificate and key
//! in `$SOCKETCOMM_BENCH_TLS/cert.pem` and `key.pem`.
//!
//!     tokio_echo [--port N] [--sink | --raw] [--tls]
//! prints `READY <port>` once listening.

use std::io::Write;
use std::sync::Arc;

use socketcomm_bench::{hello, stop_with_parent, REPLY, REQUEST};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    stop_with_parent();
    let args: Vec<String> = std::env::args().collect();
    let sink = args.iter().any(|a| a == "--sink");
    let raw = args.iter().any(|a| a == "--raw");
    let port = args
        .iter()
        .position(|a| a == "--port")
        .and_then(|i| args.get(i + 1))
        .map_or(0, |p| p.parse().expect("a port number"));
    let tls = args.iter().any(|a| a == "--tls").then(acceptor);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("READY {}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let tls = tls.clone();
        tokio::spawn(async move {
            let _ = match tls {
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => serve_any(stream, raw, sink).await,
                    Err(e) => Err(e),
                },
                None => serve_any(stream, raw, sink).await,
            };
        });
    }
}

/// A TLS 1.3 acceptor with the benchmark's certificate.
fn acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let folder = std::path::PathBuf::from(
        std::env::var_os("SOCKETCOMM_BENCH_TLS").expect("SOCKETCOMM_BENCH_TLS names the folder"),
    );
    let chain = CertificateDer::pem_file_iter(folder.join("cert.pem"))
        .expect("cert.pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("a certificate");
    let key = PrivateKeyDer::from_pem_file(folder.join("key.pem")).expect("key.pem");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("a usable certificate");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn serve_any<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    raw: bool,
    sink: bool,
) -> std::io::Result<()> {
    if raw {
        serve_raw(stream).await
    } else {
        serve(stream, sink).await
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    sink: bool,
) -> std::io::Result<()> {
    let mut greeting = [0u8; 12];
    stream.read_exact(&mut greeting).await?;
    stream.write_all(&hello()).await?;
    stream.flush().await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = Vec::with_capacity(64 * 1024);
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if sink {
            continue;
        }
        pending.extend_from_slice(&buf[..n]);
        // Echo every whole frame in the buffer with one write.
        let mut whole = 0;
        while pending.len() >= whole + 5 {
            let len = u32::from_be_bytes(pending[whole..whole + 4].try_into().unwrap()) as usize;
            if pending.len() < whole + 4 + len {
                break;
            }
            if pending[whole + 4] == REQUEST {
                pending[whole + 4] = REPLY;
            }
            whole += 4 + len;
        }
        if whole > 0 {
            stream.write_all(&pending[..whole]).await?;
            // A TLS stream may keep the end of a record until flushed (a no-op on TCP).
            stream.flush().await?;
            pending.drain(..whole);
        }
    }
}

async fn serve_raw<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
        stream.flush().await?;
    }
}
