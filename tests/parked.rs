//! A connection quiet for more than a second parks (its loop's state is dropped) and must
//! still do everything a connection does: take a message the application sends it, be closed,
//! ping its peer, and time out when idle. Each test waits past the parking before it acts.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{next_disconnected, next_event, server_with, HandPeer};

use _socketcomm::frame::{CloseCode, Frame};
use _socketcomm::{Event, Mode, Pings, ServerConfig};

/// Longer than a connection takes to park (between one and two quiet periods of 500 ms).
const PARKED: Duration = Duration::from_millis(1500);

fn events_server(config: ServerConfig) -> _socketcomm::Server {
    server_with(ServerConfig {
        mode: Mode::Events,
        ..config
    })
}

/// The connection the next Connected event is about.
async fn connected(server: &_socketcomm::Server) -> _socketcomm::Connection {
    loop {
        if let Event::Connected(conn) = next_event(server).await {
            return conn;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_takes_a_message_the_application_sends() {
    let server = events_server(ServerConfig::default());
    let (mut peer, _) = HandPeer::connect(&server, 1 << 20).await;
    let conn = connected(&server).await;
    // Once with nothing said past the hello, once after a message and its answer.
    for round in 0..2u8 {
        tokio::time::sleep(PARKED).await;
        conn.send(Bytes::from(vec![round; 100])).await.unwrap();
        assert_eq!(
            peer.recv().await,
            Some(Frame::Data(Bytes::from(vec![round; 100])))
        );
        peer.send(&Frame::Data(Bytes::from_static(b"back"))).await;
        let Event::Message(message) = next_event(&server).await else {
            panic!("a message from the parked connection's client");
        };
        assert_eq!(&message.data[..], b"back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_closed_with_its_reason() {
    let server = events_server(ServerConfig::default());
    let (mut peer, _) = HandPeer::connect(&server, 1 << 20).await;
    let conn = connected(&server).await;
    tokio::time::sleep(PARKED).await;
    conn.close("bye");
    match peer.recv().await {
        Some(Frame::Close { code, reason }) => {
            assert_eq!(code, CloseCode::NORMAL);
            assert_eq!(reason, "bye");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert_eq!(peer.recv().await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_pinged_and_its_latency_measured() {
    let server = events_server(ServerConfig {
        pings: Pings {
            interval: Some(Duration::from_millis(2500)),
            timeout: Some(Duration::from_secs(5)),
        },
        ..ServerConfig::default()
    });
    let (mut peer, _) = HandPeer::connect(&server, 1 << 20).await;
    let conn = connected(&server).await;
    let Some(Frame::Ping(token)) = peer.recv().await else {
        panic!("a ping after ping_interval, the connection parked meanwhile");
    };
    peer.send(&Frame::Pong(token)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while conn.latency().is_none() {
        assert!(Instant::now() < deadline, "the pong was never taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_times_out_when_idle() {
    let limit = Duration::from_millis(2500);
    let server = events_server(ServerConfig {
        idle_timeout: Some(limit),
        ..ServerConfig::default()
    });
    let started = Instant::now();
    let (mut peer, _) = HandPeer::connect(&server, 1 << 20).await;
    match peer.recv().await {
        Some(Frame::Close { code, .. }) => assert_eq!(code, CloseCode::IDLE_TIMEOUT),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(started.elapsed() >= limit);
    assert_eq!(
        next_disconnected(&server).await.code,
        Some(CloseCode::IDLE_TIMEOUT)
    );
}
