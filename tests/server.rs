//! The server on ephemeral loopback ports: both protocols on one port, native modes, events,
//! hostile peers, and shutdown.

mod common;

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;

use _socketcomm::frame::{encode_frame, CloseCode, Frame, FrameCodec, Hello, PROTOCOL_VERSION};
use _socketcomm::{Error, Event, Mode, Server, ServerConfig};
use common::{client, next_disconnected, next_event, server, server_with, HandPeer, LIMIT};

#[tokio::test(flavor = "multi_thread")]
async fn port_zero_binds_a_free_port() {
    let server = server(Mode::Echo);
    assert_ne!(server.local_addr().port(), 0);
    assert!(server.local_addr().ip().is_loopback());
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_mode_answers_requests_and_messages_natively() {
    let server = server(Mode::Echo);
    let client = client(&server).await;
    let reply = client.request(Bytes::from_static(b"ping")).await.unwrap();
    assert_eq!(&reply[..], b"ping");
    client.send(Bytes::from_static(b"plain")).await.unwrap();
    assert_eq!(&client.recv().await.unwrap()[..], b"plain");
}

#[tokio::test(flavor = "multi_thread")]
async fn ack_mode_answers_with_the_fixed_reply() {
    let server = server_with(ServerConfig {
        mode: Mode::Ack,
        ack_reply: Bytes::from_static(b"ok"),
        ..ServerConfig::default()
    });
    let client = client(&server).await;
    assert_eq!(
        &client.request(Bytes::from_static(b"x")).await.unwrap()[..],
        b"ok"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn events_arrive_in_order_and_replies_reach_the_client() {
    let server = server(Mode::Events);
    let client = client(&server).await;
    let Event::Connected(conn) = next_event(&server).await else {
        panic!("expected Connected first")
    };
    assert_eq!(conn.peer(), client.local_addr());

    let asking = tokio::spawn(async move {
        let reply = client.request(Bytes::from_static(b"question")).await;
        (client, reply)
    });
    let Event::Message(message) = next_event(&server).await else {
        panic!("expected a Message")
    };
    assert_eq!(&message.data[..], b"question");
    assert!(message.request_id.is_some());
    message.reply(Bytes::from_static(b"answer")).await.unwrap();
    let (client, reply) = asking.await.unwrap();
    assert_eq!(&reply.unwrap()[..], b"answer");

    client.close(LIMIT).await;
    let Event::Disconnected { conn: gone, reason } = next_event(&server).await else {
        panic!("expected Disconnected")
    };
    assert_eq!(gone.id(), conn.id());
    assert_eq!(reason.code, Some(CloseCode::NORMAL));
    assert!(server.connection(conn.id()).is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_socket_is_served_in_raw_mode_on_the_same_port() {
    let server = server(Mode::Ack);
    let mut plain = TcpStream::connect(server.local_addr()).await.unwrap();
    plain.write_all(b"Hello World").await.unwrap();
    let mut reply = vec![0u8; 1024];
    let n = tokio::time::timeout(LIMIT, plain.read(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&reply[..n], b"Your message has been received, Thank you!");

    // And a framed client at the same time.
    let client = client(&server).await;
    assert_eq!(
        &client.request(Bytes::from_static(b"hi")).await.unwrap()[..],
        b"Your message has been received, Thank you!"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_messages_become_events_with_their_bytes_intact() {
    let server = server(Mode::Events);
    let mut plain = TcpStream::connect(server.local_addr()).await.unwrap();
    plain.write_all(b"\xff\xfe not utf-8").await.unwrap();
    assert!(matches!(next_event(&server).await, Event::Connected(_)));
    let Event::Message(message) = next_event(&server).await else {
        panic!("expected a Message")
    };
    assert_eq!(&message.data[..], b"\xff\xfe not utf-8");
    assert_eq!(message.request_id, None);
    message
        .reply(Bytes::from_static(b"raw back"))
        .await
        .unwrap();
    let mut reply = [0u8; 8];
    plain.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply, b"raw back");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_frame_is_refused_with_a_close_frame_and_others_keep_being_served() {
    let server = server_with(ServerConfig {
        mode: Mode::Echo,
        max_frame: 1024,
        ..ServerConfig::default()
    });
    let bystander = client(&server).await;
    let (mut peer, hello) = HandPeer::connect(&server, 4096).await;
    assert_eq!(hello.max_frame, 1024, "the server announces its limit");
    // A length prefix of 4 GiB, with no body: refused from the prefix alone.
    peer.stream
        .write_all(&[0xff, 0xff, 0xff, 0xff, 0x01])
        .await
        .unwrap();
    let Some(Frame::Close { code, reason }) = peer.recv().await else {
        panic!("expected a close frame")
    };
    assert_eq!(code, CloseCode::FRAME_TOO_LARGE);
    assert!(reason.contains("exceeds max_frame of 1024"), "{reason}");
    assert_eq!(peer.recv().await, None, "then the connection ends");

    let reply = bystander.request(Bytes::from_static(b"still here?")).await;
    assert_eq!(&reply.unwrap()[..], b"still here?");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_frame_type_closes_with_a_protocol_error() {
    let server = server(Mode::Events);
    let (mut peer, _) = HandPeer::connect(&server, 4096).await;
    peer.stream.write_all(&[0, 0, 0, 1, 0x7e]).await.unwrap();
    let Some(Frame::Close { code, reason }) = peer.recv().await else {
        panic!("expected a close frame")
    };
    assert_eq!(code, CloseCode::PROTOCOL_ERROR);
    assert!(reason.contains("0x7e"), "{reason}");
    assert!(matches!(next_event(&server).await, Event::Connected(_)));
    let Event::Disconnected { reason, .. } = next_event(&server).await else {
        panic!("expected Disconnected")
    };
    assert_eq!(reason.code, Some(CloseCode::PROTOCOL_ERROR));
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_after_the_magic_is_refused_in_the_hello() {
    let server = server(Mode::Echo);
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    // The magic, then an empty version range and a zero max_frame.
    stream
        .write_all(&[0x89, b'S', b'C', b'M', 9, 1, 0, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let hello = Hello::decode(answer[..12].try_into().unwrap()).unwrap();
    assert_eq!(hello.agreed_version(), None);
    let text = String::from_utf8_lossy(&answer[12..]);
    assert!(text.contains("bad hello"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_from_the_future_is_told_which_version_the_server_speaks() {
    let server = server(Mode::Echo);
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let future = Hello {
        min_version: PROTOCOL_VERSION + 1,
        max_version: PROTOCOL_VERSION + 1,
        max_frame: 4096,
    };
    stream.write_all(&future.encode()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let hello = Hello::decode(answer[..12].try_into().unwrap()).unwrap();
    assert_eq!(hello.agreed_version(), None);
    assert_eq!(hello.max_version, PROTOCOL_VERSION);
    assert!(String::from_utf8_lossy(&answer[12..]).contains("this server speaks 1..=2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_vanishes_mid_frame_is_reported_and_others_keep_being_served() {
    let server = server(Mode::Events);
    let (mut peer, _) = HandPeer::connect(&server, 4096).await;
    // Announce 100 bytes, send 3, leave.
    peer.stream
        .write_all(&[0, 0, 0, 100, 0x01, 1, 2])
        .await
        .unwrap();
    drop(peer);
    assert!(matches!(next_event(&server).await, Event::Connected(_)));
    let Event::Disconnected { reason, .. } = next_event(&server).await else {
        panic!("expected Disconnected")
    };
    assert!(reason.reason.contains("middle of a frame"), "{reason}");

    let other = common::client(&server).await;
    assert!(matches!(next_event(&server).await, Event::Connected(_)));
    other.send(Bytes::from_static(b"next")).await.unwrap();
    let Event::Message(message) = next_event(&server).await else {
        panic!("expected a Message")
    };
    assert_eq!(&message.data[..], b"next");
}

#[tokio::test(flavor = "multi_thread")]
async fn binding_a_port_in_use_says_so() {
    let first = server(Mode::Echo);
    let Err(error) = Server::bind(first.local_addr(), ServerConfig::default()) else {
        panic!("a second bind must fail")
    };
    let Error::Io { source, .. } = &error else {
        panic!("expected an I/O error, got {error}")
    };
    assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
    assert!(error.to_string().contains("another program"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_closes_connections_with_a_reason_and_ends_the_event_queue() {
    let server = server(Mode::Events);
    let client = client(&server).await;
    assert!(matches!(next_event(&server).await, Event::Connected(_)));
    client.send(Bytes::from_static(b"in flight")).await.unwrap();
    assert!(matches!(next_event(&server).await, Event::Message(_)));

    server.shutdown();
    tokio::time::timeout(LIMIT, server.wait_closed(Duration::from_secs(5)))
        .await
        .expect("shutdown finishes");
    let error = client.recv().await.unwrap_err();
    let Error::Closed(info) = error else {
        panic!("expected Closed, got {error}")
    };
    assert_eq!(info.code, Some(CloseCode::GOING_AWAY));
    assert!(info.reason.contains("shutting down"));

    assert!(matches!(
        next_event(&server).await,
        Event::Disconnected { .. }
    ));
    assert!(
        server.events().recv_async().await.is_err(),
        "the event queue ends after the last event"
    );
    assert!(
        TcpStream::connect(server.local_addr()).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_while_replying_does_not_disturb_the_server() {
    let server = server(Mode::Events);
    let plain = TcpStream::connect(server.local_addr()).await.unwrap();
    let std_stream = plain.into_std().unwrap();
    let socket = socket2::SockRef::from(&std_stream);
    // SO_LINGER 0: close() sends a reset instead of a FIN.
    socket.set_linger(Some(Duration::ZERO)).unwrap();
    let mut plain = TcpStream::from_std(std_stream).unwrap();
    plain.write_all(b"hi").await.unwrap();
    assert!(matches!(next_event(&server).await, Event::Connected(_)));
    let Event::Message(message) = next_event(&server).await else {
        panic!("expected a Message")
    };
    drop(plain);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The reply races the reset: it fails or is dropped, and nothing else happens.
    let _ = message.reply(Bytes::from(vec![0u8; 1 << 20])).await;
    let Event::Disconnected { reason, .. } = next_event(&server).await else {
        panic!("expected Disconnected")
    };
    assert!(
        reason.reason.contains("reset") || reason.reason.contains("closed"),
        "{reason}"
    );

    let client = client(&server).await;
    client.send(Bytes::from_static(b"after")).await.unwrap();
    assert!(matches!(next_event(&server).await, Event::Connected(_)));
    assert!(matches!(next_event(&server).await, Event::Message(_)));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_clients_times_500_messages_keep_order_and_content() {
    let server = server(Mode::Echo);
    let mut clients = Vec::new();
    for c in 0..200u32 {
        let port = server.local_addr().port();
        clients.push(tokio::spawn(async move {
            let client = _socketcomm::Client::connect("127.0.0.1", port, Default::default())
                .await
                .unwrap();
            for i in 0..500u32 {
                let body = format!("{c}/{i}/{}", c.wrapping_mul(31).wrapping_add(i));
                client.send(Bytes::from(body)).await.unwrap();
            }
            for i in 0..500u32 {
                let expected = format!("{c}/{i}/{}", c.wrapping_mul(31).wrapping_add(i));
                assert_eq!(client.recv().await.unwrap(), Bytes::from(expected));
            }
        }));
    }
    for client in clients {
        tokio::time::timeout(Duration::from_secs(60), client)
            .await
            .expect("in time")
            .expect("no client failed");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn broadcast_mode_relays_to_everyone_else() {
    let server = server(Mode::Broadcast);
    let a = client(&server).await;
    let b = client(&server).await;
    let c = client(&server).await;
    while server.connections().len() < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.send(Bytes::from_static(b"from a")).await.unwrap();
    assert_eq!(&b.recv().await.unwrap()[..], b"from a");
    assert_eq!(&c.recv().await.unwrap()[..], b"from a");
    assert!(
        tokio::time::timeout(Duration::from_millis(100), a.recv())
            .await
            .is_err(),
        "the sender does not hear itself"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn over_max_connections_a_framed_client_is_told_the_server_is_full() {
    let server = server_with(ServerConfig {
        mode: Mode::Echo,
        max_connections: 1,
        ..ServerConfig::default()
    });
    let first = client(&server).await;
    let port = server.local_addr().port();
    let Err(error) = _socketcomm::Client::connect("127.0.0.1", port, Default::default()).await
    else {
        panic!("the second client must be refused")
    };
    let Error::Closed(info) = &error else {
        panic!("expected Closed, got {error}")
    };
    assert_eq!(info.code, Some(CloseCode::SERVER_FULL));
    assert!(info.reason.contains("at most 1 connections"), "{info}");
    assert_eq!(
        &first.request(Bytes::from_static(b"ok")).await.unwrap()[..],
        b"ok"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_is_free_again_once_its_disconnected_event_is_seen() {
    let server = server_with(ServerConfig {
        mode: Mode::Echo,
        max_connections: 1,
        ..ServerConfig::default()
    });
    // Each round: the only slot's client leaves; on its Disconnected the next one connects.
    // Repeated: with the slot freed after the event, this lost the race within ~100 rounds.
    let port = server.local_addr().port();
    let mut current = client(&server).await;
    for round in 0..200 {
        current.close(Duration::from_secs(1)).await;
        next_disconnected(&server).await;
        current = match _socketcomm::Client::connect("127.0.0.1", port, Default::default()).await {
            Ok(next) => next,
            Err(e) => panic!("round {round}: refused right after the Disconnected event: {e}"),
        };
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_says_nothing_is_closed_after_hello_timeout() {
    let server = server_with(ServerConfig {
        mode: Mode::Echo,
        hello_timeout: Some(Duration::from_millis(300)),
        ..ServerConfig::default()
    });
    let started = std::time::Instant::now();
    let mut silent = TcpStream::connect(server.local_addr()).await.unwrap();
    // Half a hello is not a hello.
    let mut half = TcpStream::connect(server.local_addr()).await.unwrap();
    half.write_all(&Hello::client(1 << 20).encode()[..6])
        .await
        .unwrap();
    let on_time = client(&server).await;
    for stream in [&mut silent, &mut half] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(LIMIT, stream.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "closed, got {read:?}");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "closed too soon: {took:?}"
    );
    let reasons = [
        next_disconnected(&server).await,
        next_disconnected(&server).await,
    ];
    for reason in &reasons {
        assert_eq!(reason.code, Some(CloseCode::IDLE_TIMEOUT), "{reason}");
        assert!(reason.reason.contains("hello_timeout"), "{reason}");
    }
    assert_eq!(server.stats().idle_timeouts, 2);
    // A client that spoke in time is served long after the deadline.
    assert_eq!(
        &on_time.request(Bytes::from_static(b"late")).await.unwrap()[..],
        b"late"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn max_connections_per_ip_refuses_one_more_from_the_same_address() {
    let server = server_with(ServerConfig {
        mode: Mode::Echo,
        max_connections_per_ip: Some(2),
        ..ServerConfig::default()
    });
    let port = server.local_addr().port();
    let first = client(&server).await;
    let _second = client(&server).await;
    let Err(Error::Closed(info)) =
        _socketcomm::Client::connect("127.0.0.1", port, Default::default()).await
    else {
        panic!("a third connection from 127.0.0.1 must be refused")
    };
    assert_eq!(info.code, Some(CloseCode::SERVER_FULL), "{info}");
    assert!(info.reason.contains("max_connections_per_ip"), "{info}");
    // One leaves: its address may connect again.
    first.close(Duration::from_secs(1)).await;
    next_disconnected(&server).await;
    let again = _socketcomm::Client::connect("127.0.0.1", port, Default::default()).await;
    assert!(again.is_ok(), "{:?}", again.err());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_client_is_closed_with_the_idle_code() {
    let server = server_with(ServerConfig {
        mode: Mode::Echo,
        idle_timeout: Some(Duration::from_millis(200)),
        ..ServerConfig::default()
    });
    let client = client(&server).await;
    let Err(Error::Closed(info)) = client.recv().await else {
        panic!("the idle connection must be closed")
    };
    assert_eq!(info.code, Some(CloseCode::IDLE_TIMEOUT));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_trickles_a_frame_is_dropped_while_a_busy_one_is_kept() {
    let server = server_with(ServerConfig {
        mode: Mode::Echo,
        idle_timeout: Some(Duration::from_millis(400)),
        ..ServerConfig::default()
    });
    // A slowloris: a frame header announcing 100 bytes, then one byte every 50 ms, so that
    // bytes keep arriving but no frame is ever whole.
    let (mut slow, _) = HandPeer::connect(&server, 1 << 20).await;
    slow.stream.write_all(&[0, 0, 0, 100, 1]).await.unwrap();
    let busy = client(&server).await;
    let started = std::time::Instant::now();
    let mut dropped = None;
    for n in 0..60u32 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let body = Bytes::from(n.to_string());
        assert_eq!(busy.request(body.clone()).await.unwrap(), body);
        if slow.stream.write_all(b"x").await.is_err() {
            dropped = Some(started.elapsed());
            break;
        }
        if dropped.is_none() && server.stats().idle_timeouts == 1 {
            dropped = Some(started.elapsed());
            break;
        }
    }
    let dropped = dropped.expect("the trickling client was never dropped");
    assert!(dropped >= Duration::from_millis(350), "{dropped:?}");
    assert!(dropped < Duration::from_secs(2), "{dropped:?}");
    let Some(Frame::Close { code, .. }) = slow.recv().await else {
        panic!("a close frame with the reason")
    };
    assert_eq!(code, CloseCode::IDLE_TIMEOUT);
    // The busy client, whose messages keep completing, was never idle.
    assert_eq!(
        busy.request(Bytes::from_static(b"still")).await.unwrap(),
        "still"
    );
}

/// A plain socket that writes `chunk` every 50 ms to a raw echo server with a 400 ms
/// `idle_timeout` and `raw_min_rate`, reading the echoes; returns how long it was served
/// (`None`: still served after 1.5 s).
async fn raw_sender_served_for(server: &Server, chunk: &'static [u8]) -> Option<Duration> {
    let mut stream = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut echoed = vec![0; 4096];
    while started.elapsed() < Duration::from_millis(1500) {
        if stream.write_all(chunk).await.is_err() {
            return Some(started.elapsed());
        }
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut echoed)).await {
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    None
}

fn raw_echo(raw_min_rate: u64) -> Server {
    server_with(ServerConfig {
        mode: Mode::Echo,
        idle_timeout: Some(Duration::from_millis(400)),
        raw_min_rate,
        ..ServerConfig::default()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_client_that_trickles_bytes_is_dropped_under_raw_min_rate() {
    // 100 bytes per second of a 400 ms idle_timeout: 40 bytes in each 400 ms. A byte every
    // 100 ms or so is 4; 64 bytes every 100 ms is 256.
    let server = raw_echo(100);
    let (trickler, steady) = tokio::join!(
        raw_sender_served_for(&server, b"x"),
        raw_sender_served_for(&server, &[b'y'; 64])
    );
    let dropped = trickler.expect("the trickling client was never dropped");
    assert!(dropped >= Duration::from_millis(350), "{dropped:?}");
    assert_eq!(steady, None, "a client that sends enough is kept");
    assert_eq!(server.stats().idle_timeouts, 1);
    // Without the rule every byte is a message, and a message is activity.
    let lenient = raw_echo(0);
    assert_eq!(raw_sender_served_for(&lenient, b"x").await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_application_can_close_one_connection_with_a_reason() {
    let server = server(Mode::Events);
    let client = client(&server).await;
    let Event::Connected(conn) = next_event(&server).await else {
        panic!("expected Connected")
    };
    conn.send(Bytes::from_static(b"last words")).await.unwrap();
    conn.close("maintenance");
    assert_eq!(&client.recv().await.unwrap()[..], b"last words");
    let Err(Error::Closed(info)) = client.recv().await else {
        panic!("the connection must end")
    };
    assert!(info.reason.contains("maintenance"), "{info}");
    let Event::Disconnected { reason, .. } = next_event(&server).await else {
        panic!("expected Disconnected")
    };
    assert_eq!(reason.reason, "maintenance");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_socket_gets_large_echoes_back_intact() {
    // Reads grow to 64 KiB and the echo hands its read buffer over to be written: the bytes
    // must come back whole and in order whatever the chunking.
    let server = server(Mode::Echo);
    let stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let sent: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let expected = sent.clone();
    let writing = tokio::spawn(async move {
        for chunk in sent.chunks(100_000) {
            writer.write_all(chunk).await.unwrap();
        }
        writer
    });
    let mut received = vec![0u8; expected.len()];
    tokio::time::timeout(LIMIT, reader.read_exact(&mut received))
        .await
        .expect("the echo in time")
        .unwrap();
    assert!(received == expected, "the echo differs from what was sent");
    drop(writing.await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_framed_echo_answers_every_message_whole_and_in_order_however_it_arrives() {
    // Messages of many sizes, requests among them, and a ping, written in slices that end
    // anywhere: the echo hands whole messages over in one piece (keeping what follows them),
    // answers each request with a reply, and the ping is answered as a ping.
    let server = server(Mode::Echo);
    let (mut peer, _) = HandPeer::connect(&server, 1 << 24).await;
    let sizes = [
        0usize,
        1,
        100,
        5_000,
        70_000,
        300_000,
        1 << 20,
        3,
        64 * 1024,
    ];
    let mut sent = Vec::new();
    for (i, &size) in sizes.iter().cycle().take(40).enumerate() {
        let body = Bytes::from((0..size).map(|j| (i * 7 + j) as u8).collect::<Vec<u8>>());
        sent.push(if i % 3 == 0 {
            Frame::Request { id: i as u32, body }
        } else {
            Frame::Data(body)
        });
    }
    let mut out = bytes::BytesMut::new();
    for (i, frame) in sent.iter().enumerate() {
        encode_frame(frame, &mut out);
        if i == 20 {
            encode_frame(&Frame::Ping(0x6d6964), &mut out);
        }
    }
    let (mut reader, mut writer) = peer.stream.split();
    let writing = async {
        let mut slices = [1usize, 4, 5, 4096, 77_777, 12, 1 << 20].iter().cycle();
        let mut rest = &out[..];
        while !rest.is_empty() {
            let n = (*slices.next().unwrap()).min(rest.len());
            writer.write_all(&rest[..n]).await.unwrap();
            rest = &rest[n..];
        }
    };
    let reading = async {
        let mut codec = FrameCodec::new(u32::MAX);
        let mut buf = std::mem::take(&mut peer.buf);
        let mut answers = Vec::new();
        while answers.len() < sent.len() + 1 {
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                answers.push(frame);
            }
            if answers.len() < sent.len() + 1 {
                assert!(
                    reader.read_buf(&mut buf).await.unwrap() > 0,
                    "the echo ended"
                );
            }
        }
        answers
    };
    let ((), answers) = tokio::time::timeout(LIMIT, async { tokio::join!(writing, reading) })
        .await
        .expect("every answer in time");
    let mut answers = answers.into_iter();
    for (i, frame) in sent.into_iter().enumerate() {
        let expected = match frame {
            Frame::Request { id, body } => Frame::Reply { id, body },
            other => other,
        };
        assert_eq!(answers.next().unwrap(), expected, "answer {i}");
        if i == 20 {
            assert_eq!(answers.next().unwrap(), Frame::Pong(0x6d6964));
        }
    }
}
