//! Heartbeats: both ends ping, measure the latency, and close a connection whose peer has gone
//! silent within `ping_interval + ping_timeout`; pings keep nobody busy for `idle_timeout`, and a
//! peer that only receives (a long upload) is not taken for gone.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use _socketcomm::frame::{Hello, HELLO_LEN};
use _socketcomm::{
    Client, ClientConfig, CloseCode, Error, Event, Frame, Mode, Pings, ServerConfig,
};
use common::{next_disconnected, next_event, server_with, HandPeer, LIMIT};

const INTERVAL: Duration = Duration::from_millis(100);
const TIMEOUT: Duration = Duration::from_millis(200);

fn quick_pings() -> Pings {
    Pings {
        interval: Some(INTERVAL),
        timeout: Some(TIMEOUT),
    }
}

fn echo_server(pings: Pings) -> _socketcomm::Server {
    server_with(ServerConfig {
        mode: Mode::Echo,
        pings,
        ..ServerConfig::default()
    })
}

async fn client_with(server: &_socketcomm::Server, pings: Pings) -> Client {
    let config = ClientConfig {
        pings,
        ..ClientConfig::default()
    };
    Client::connect("127.0.0.1", server.local_addr().port(), config)
        .await
        .unwrap()
}

/// A server written by hand: it answers one client's hello, then only reads (pausing `pause`
/// after each read) and never sends a byte. Returns its port and its task.
async fn hand_server(pause: Duration) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut hello = [0u8; HELLO_LEN];
        stream.read_exact(&mut hello).await.unwrap();
        let offered = Hello::decode(&hello).unwrap();
        stream
            .write_all(&Hello::answer(&offered, 1 << 20).encode())
            .await
            .unwrap();
        let mut sink = vec![0u8; 16 * 1024];
        while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {
            tokio::time::sleep(pause).await;
        }
    });
    (port, task)
}

/// Waits (bounded) until `measured` gives a latency.
async fn latency_of(measured: impl Fn() -> Option<Duration>) -> Duration {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(latency) = measured() {
            return latency;
        }
        assert!(Instant::now() < deadline, "no latency measured in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn both_ends_ping_and_measure_the_latency() {
    let server = echo_server(quick_pings());
    let client = client_with(&server, quick_pings()).await;
    assert_eq!(
        client.latency(),
        None,
        "nothing is measured before the first ping"
    );
    let Event::Connected(conn) = next_event(&server).await else {
        panic!("the first event is the connection")
    };
    let on_server = latency_of(|| conn.latency()).await;
    let on_client = latency_of(|| client.latency()).await;
    // Loopback: well under the interval, and more than nothing.
    for latency in [on_server, on_client] {
        assert!(
            latency > Duration::ZERO && latency < INTERVAL,
            "{latency:?}"
        );
    }
    // The connection is alive and well after many pings.
    tokio::time::sleep(INTERVAL * 5).await;
    assert_eq!(
        &client
            .request(Bytes::from_static(b"still here"))
            .await
            .unwrap()[..],
        b"still here"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_closes_a_client_that_never_answers_a_ping() {
    let server = echo_server(quick_pings());
    let (mut silent, _) = HandPeer::connect(&server, 1 << 20).await;
    let started = Instant::now();
    // The hand peer reads (its kernel acknowledges) but never answers: it is hung.
    let first = silent.recv().await;
    assert!(matches!(first, Some(Frame::Ping(_))), "{first:?}");
    let reason = next_disconnected(&server).await;
    let took = started.elapsed();
    assert_eq!(reason.code, Some(CloseCode::PING_TIMEOUT), "{reason}");
    assert!(reason.reason.contains("ping_timeout"), "{reason}");
    // Within ping_interval + ping_timeout, and slack for a loaded machine.
    assert!(took < INTERVAL + TIMEOUT * 2, "took {took:?}");
    // It is told why, in a close frame.
    let mut closed = None;
    while let Some(frame) = silent.recv().await {
        if let Frame::Close { code, .. } = frame {
            closed = Some(code);
        }
    }
    assert_eq!(closed, Some(CloseCode::PING_TIMEOUT));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_closes_a_connection_to_a_server_gone_silent() {
    // A server that answers the hello, then never sends a byte (and reads what comes).
    let (port, hung) = hand_server(Duration::ZERO).await;
    let config = ClientConfig {
        pings: quick_pings(),
        ..ClientConfig::default()
    };
    let client = Client::connect("127.0.0.1", port, config).await.unwrap();
    let started = Instant::now();
    let ended = tokio::time::timeout(LIMIT, client.recv()).await.unwrap();
    let took = started.elapsed();
    let Err(Error::Closed(info)) = ended else {
        panic!("the connection must end, got {ended:?}")
    };
    assert_eq!(info.code, Some(CloseCode::PING_TIMEOUT), "{info}");
    assert!(took < INTERVAL + TIMEOUT * 2, "took {took:?}");
    hung.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn pings_do_not_keep_a_silent_client_from_its_idle_timeout() {
    let server = server_with(ServerConfig {
        mode: Mode::Echo,
        pings: quick_pings(),
        idle_timeout: Some(Duration::from_millis(600)),
        ..ServerConfig::default()
    });
    let client = client_with(&server, quick_pings()).await;
    let ended = tokio::time::timeout(LIMIT, client.recv()).await.unwrap();
    let Err(Error::Closed(info)) = ended else {
        panic!("the idle client must be closed, got {ended:?}")
    };
    assert_eq!(info.code, Some(CloseCode::IDLE_TIMEOUT), "{info}");
    assert!(client.latency().is_some(), "it did answer pings meanwhile");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_only_receives_is_not_taken_for_gone() {
    // A server that answers the hello and then only reads, slowly and for ever: it sends
    // nothing, not even pongs (a v1 server with pings off, busy receiving an upload).
    let (port, reader) = hand_server(Duration::from_millis(5)).await;
    let config = ClientConfig {
        pings: quick_pings(),
        ..ClientConfig::default()
    };
    let client = Client::connect("127.0.0.1", port, config).await.unwrap();
    // Ten ping timeouts of sending, with the receive side silent throughout.
    let until = Instant::now() + TIMEOUT * 10;
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    while Instant::now() < until {
        tokio::time::timeout(LIMIT, client.send(chunk.clone()))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("the sending client was dropped: {e}"));
    }
    assert!(!client.is_closed());
    reader.abort();
}
