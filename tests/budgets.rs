//! What a server holds for its clients is bounded in bytes (`inbound_bytes` per connection,
//! `max_buffered` in all): once a budget is spent the connection stops reading its socket, so
//! the client is pushed back on by TCP, and nothing is lost: every message arrives, in order,
//! once the application takes what came before.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{next_event, server_with, HandPeer, LIMIT};
use tokio::io::AsyncWriteExt;

use _socketcomm::frame::encode_frame;
use _socketcomm::{CloseCode, Event, Frame, Mode, Server, ServerConfig};

const MESSAGE: usize = 64 * 1024;

fn config(inbound_bytes: usize, max_buffered: usize) -> ServerConfig {
    ServerConfig {
        mode: Mode::Events,
        inbound_bytes,
        max_buffered,
        ..ServerConfig::default()
    }
}

/// The message number `i` of sender `sender`: its bytes say who sent it and where it belongs.
fn numbered(sender: u8, i: usize) -> Bytes {
    let mut data = vec![sender; MESSAGE];
    data[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Bytes::from(data)
}

/// Connects a hand-written peer that writes `count` messages as fast as the server takes them.
async fn flood(server: &Server, sender: u8, count: usize) -> tokio::task::JoinHandle<HandPeer> {
    let (mut peer, _) = HandPeer::connect(server, 1 << 24).await;
    tokio::spawn(async move {
        let mut out = bytes::BytesMut::new();
        for i in 0..count {
            encode_frame(&Frame::Data(numbered(sender, i)), &mut out);
            peer.stream.write_all(&out).await.unwrap();
            out.clear();
        }
        peer
    })
}

/// The bytes the server has read from its sockets once they stop growing (it stopped reading).
async fn bytes_read_when_settled(server: &Server) -> u64 {
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut last = server.stats().bytes_in;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = server.stats().bytes_in;
        if now == last || tokio::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Takes events until `count` messages came, checking each sender's order and bytes.
async fn take_messages(server: &Server, senders: usize, count: usize) {
    let mut next = vec![0usize; senders];
    let mut taken = 0;
    while taken < count {
        if let Event::Message(message) = next_event(server).await {
            let sender = message.data[MESSAGE - 1];
            let i = u64::from_be_bytes(message.data[..8].try_into().unwrap()) as usize;
            assert_eq!(
                i, next[sender as usize],
                "sender {sender}'s messages in order"
            );
            assert_eq!(message.data, numbered(sender, i));
            next[sender as usize] += 1;
            taken += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_stops_reading_once_its_waiting_messages_fill_inbound_bytes() {
    let server = server_with(config(1 << 20, 1 << 40));
    // 200 x 64 KiB = 12.5 MiB, more than the sockets' buffers hold between them.
    let writer = flood(&server, 0, 200).await;
    let read = bytes_read_when_settled(&server).await;
    // The budget (1 MiB), the message read but held back, and the read buffer's room.
    assert!(
        read < (1 << 20) + 6 * MESSAGE as u64,
        "the server read {read} bytes while the application took nothing"
    );
    assert!(!writer.is_finished(), "the client is pushed back on");
    take_messages(&server, 1, 200).await;
    tokio::time::timeout(LIMIT, writer).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn max_buffered_bounds_every_connection_together() {
    let server = server_with(config(8 << 20, 2 << 20));
    let mut writers = Vec::new();
    for sender in 0..4 {
        writers.push(flood(&server, sender, 50).await);
    }
    let read = bytes_read_when_settled(&server).await;
    assert!(
        read < (2 << 20) + 4 * 6 * MESSAGE as u64,
        "the server read {read} bytes from four clients while the application took nothing"
    );
    take_messages(&server, 4, 200).await;
    for writer in writers {
        tokio::time::timeout(LIMIT, writer).await.unwrap().unwrap();
    }
}

/// Two clients each sending a 3 MiB message to a server that may hold 4 MiB: the frames in
/// progress count, so the server reads no more than 4 MiB of the 6 (and a frame waits for
/// room before its bytes are read); a frame that finds no room within 10 s ends its
/// connection with code 1010 (two half-received frames would otherwise wait for each other's
/// room for ever), except the one that has waited longest, which then gets the room: at least
/// one frame arrives, and every frame that arrives is whole.
#[tokio::test(flavor = "multi_thread")]
async fn frames_in_progress_count_towards_max_buffered() {
    const LARGE: usize = 3 << 20;
    let server = server_with(config(16 << 20, 4 << 20));
    let mut writers = Vec::new();
    for sender in 0..2u8 {
        let (mut peer, _) = HandPeer::connect(&server, 1 << 24).await;
        writers.push(tokio::spawn(async move {
            let mut out = bytes::BytesMut::new();
            encode_frame(&Frame::Data(Bytes::from(vec![sender; LARGE])), &mut out);
            // Slices, so that the two frames arrive side by side.
            for chunk in out.chunks(128 * 1024) {
                if peer.stream.write_all(chunk).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // The connection stays open until the test ends: a sender whose frame arrived
            // whole and then left would add a Disconnected of its own ("closed by the client")
            // to the two events counted below (a run under load saw it come first).
            std::future::pending::<()>().await;
            drop(peer);
        }));
    }
    let read = bytes_read_when_settled(&server).await;
    assert!(
        read < (4 << 20) + 3 * 256 * 1024,
        "the server read {read} bytes of two 3 MiB frames with room for 4 MiB"
    );
    let mut whole = 0;
    let mut busy = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while whole + busy < 2 && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(30), server.events().recv_async()).await {
            Ok(Ok(Event::Message(message))) => {
                assert_eq!(message.data.len(), LARGE);
                let sender = message.data[0];
                assert!(
                    message.data.iter().all(|&b| b == sender),
                    "a frame arrives whole"
                );
                whole += 1;
            }
            Ok(Ok(Event::Disconnected { reason, .. })) => {
                assert_eq!(reason.code, Some(CloseCode::SERVER_BUSY), "{reason:?}");
                busy += 1;
            }
            Ok(Ok(_)) => {}
            other => panic!("no event in time: {other:?}"),
        }
    }
    assert!(
        whole >= 1,
        "at least one of the two frames arrives ({busy} refused)"
    );
    assert_eq!(whole + busy, 2);
    for writer in writers {
        writer.abort();
    }
}
