//! The limit: a minimal tokio server that speaks socketcomm's framed protocol and echoes each
//! frame (a REQUEST comes back as a REPLY), with nothing else. `--sink` reads and discards;
//! `--raw` speaks no protocol and writes back whatever it reads (the limit for plain sockets).
//!
//!     tokio_echo [--port N] [--sink | --raw]
//! prints `READY <port>` once listening.

use std::io::Write;

use socketcomm_bench::{hello, stop_with_parent, REPLY, REQUEST};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("READY {}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let _ = if raw {
                serve_raw(stream).await
            } else {
                serve(stream, sink).await
            };
        });
    }
}

async fn serve(mut stream: TcpStream, sink: bool) -> std::io::Result<()> {
    let mut greeting = [0u8; 12];
    stream.read_exact(&mut greeting).await?;
    stream.write_all(&hello()).await?;
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
            pending.drain(..whole);
        }
    }
}

async fn serve_raw(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}
