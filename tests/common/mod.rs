//! Helpers shared by the integration tests: servers on ephemeral loopback ports, and a raw
//! socket that speaks the protocol by hand.
#![allow(dead_code)]

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::codec::Decoder;

use _socketcomm::frame::{encode_frame, Frame, FrameCodec, Hello, HELLO_LEN};
use _socketcomm::{Client, ClientConfig, Event, Mode, Server, ServerConfig};

/// Every wait in the tests is bounded by this.
pub const LIMIT: Duration = Duration::from_secs(10);

pub fn server(mode: Mode) -> Server {
    server_with(ServerConfig {
        mode,
        ..ServerConfig::default()
    })
}

pub fn server_with(config: ServerConfig) -> Server {
    server_with_addr("127.0.0.1:0".parse().unwrap(), config)
}

pub fn server_with_addr(addr: std::net::SocketAddr, config: ServerConfig) -> Server {
    let server = Server::bind(addr, config).unwrap();
    assert!(server.start(&Handle::current()));
    server
}

pub async fn client(server: &Server) -> Client {
    let port = server.local_addr().port();
    Client::connect("127.0.0.1", port, ClientConfig::default())
        .await
        .unwrap()
}

pub async fn next_event(server: &Server) -> Event {
    tokio::time::timeout(LIMIT, server.events().recv_async())
        .await
        .expect("an event in time")
        .expect("the server is running")
}

/// Why the next connection to end ended (the events before its Disconnected are skipped).
pub async fn next_disconnected(server: &Server) -> _socketcomm::CloseInfo {
    loop {
        if let Event::Disconnected { reason, .. } = next_event(server).await {
            return reason;
        }
    }
}

/// A framed peer written by hand, to send what a well-behaved client never would.
pub struct HandPeer {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

impl HandPeer {
    /// Connects and exchanges hellos, announcing `max_frame`.
    pub async fn connect(server: &Server, max_frame: u32) -> (HandPeer, Hello) {
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        stream
            .write_all(&Hello::client(max_frame).encode())
            .await
            .unwrap();
        let mut hello = [0u8; HELLO_LEN];
        tokio::time::timeout(LIMIT, stream.read_exact(&mut hello))
            .await
            .unwrap()
            .unwrap();
        let peer = HandPeer {
            stream,
            buf: BytesMut::new(),
        };
        (peer, Hello::decode(&hello).unwrap())
    }

    pub async fn send(&mut self, frame: &Frame) {
        let mut out = BytesMut::new();
        encode_frame(frame, &mut out);
        self.stream.write_all(&out).await.unwrap();
    }

    /// The next frame, or `None` at the end of the stream.
    pub async fn recv(&mut self) -> Option<Frame> {
        let mut codec = FrameCodec::new(u32::MAX);
        loop {
            if let Some(frame) = codec.decode(&mut self.buf).unwrap() {
                return Some(frame);
            }
            let read = tokio::time::timeout(LIMIT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("a frame in time")
                .unwrap();
            if read == 0 {
                return None;
            }
        }
    }
}
