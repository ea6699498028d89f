//! The client against our server and against servers that are not ours.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use _socketcomm::frame::{CloseCode, Frame, Hello};
use _socketcomm::{Client, ClientConfig, Error, Event, Mode, ServerConfig};
use common::{client, next_event, server, server_with, HandPeer, LIMIT};

/// A "server" that answers the hello as socketcomm does, then sends `then` and waits for the end.
async fn hand_written_server(then: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut hello = [0u8; 12];
        stream.read_exact(&mut hello).await.unwrap();
        let offered = Hello::decode(&hello).unwrap();
        stream
            .write_all(&Hello::answer(&offered, 4096).encode())
            .await
            .unwrap();
        stream.write_all(then).await.unwrap();
        let _ = stream.read_to_end(&mut Vec::new()).await;
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_port_refuses_with_the_os_error_and_a_hint() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let Err(error) = Client::connect("127.0.0.1", port, ClientConfig::default()).await else {
        panic!("nothing listens there")
    };
    let Error::Io { source, .. } = &error else {
        panic!("expected an I/O error, got {error}")
    };
    assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(
        error.to_string().contains("is the server running"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_server_is_not_mistaken_for_a_socketcomm_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        // Like the original server.py: read once, answer with text, close.
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf).await;
        let _ = stream.write_all(b"Your message has been received").await;
    });
    let Err(error) = Client::connect("127.0.0.1", port, ClientConfig::default()).await else {
        panic!("the hello must fail")
    };
    assert!(matches!(error, Error::Protocol(_)), "{error}");
    assert!(error.to_string().contains("raw=True"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_mode_talks_to_a_plain_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).await.unwrap();
        stream.write_all(&buf[..n]).await.unwrap();
    });
    let config = ClientConfig {
        raw: true,
        ..ClientConfig::default()
    };
    let client = Client::connect("127.0.0.1", port, config).await.unwrap();
    let reply = client.request(Bytes::from_static(b"Hello World")).await;
    assert_eq!(&reply.unwrap()[..], b"Hello World");
    let error = client.recv().await.unwrap_err();
    assert!(matches!(error, Error::Closed(_)), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_answers_the_hello_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = ClientConfig {
        connect_timeout: Duration::from_millis(200),
        ..ClientConfig::default()
    };
    let Err(error) = Client::connect("127.0.0.1", port, config).await else {
        panic!("nobody answers")
    };
    assert!(matches!(error, Error::Timeout(_)), "{error}");
    assert!(error.to_string().contains("connect_timeout"), "{error}");
    drop(listener);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_the_servers_limit_is_refused_before_sending() {
    let server = server_with(ServerConfig {
        mode: Mode::Echo,
        max_frame: 1024,
        ..ServerConfig::default()
    });
    let client = client(&server).await;
    let error = client.send(Bytes::from(vec![0u8; 2000])).await.unwrap_err();
    assert!(
        matches!(error, Error::FrameTooLarge { max: 1024, .. }),
        "{error}"
    );
    // Nothing was sent, so the connection is intact.
    let reply = client.request(Bytes::from_static(b"small")).await.unwrap();
    assert_eq!(&reply[..], b"small");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_never_sends_more_than_the_client_accepts() {
    let server = server(Mode::Events);
    let config = ClientConfig {
        max_frame: 1024,
        ..ClientConfig::default()
    };
    let port = server.local_addr().port();
    let client = Client::connect("127.0.0.1", port, config).await.unwrap();
    let Event::Connected(conn) = next_event(&server).await else {
        panic!("expected Connected")
    };
    // The server knows the client's limit and refuses locally...
    let refused = conn.send(Bytes::from(vec![1u8; 4096])).await.unwrap_err();
    assert!(matches!(refused, Error::FrameTooLarge { .. }), "{refused}");
    // ...and a message within it arrives.
    conn.send(Bytes::from_static(b"fits")).await.unwrap();
    assert_eq!(&client.recv().await.unwrap()[..], b"fits");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_get_their_own_replies_whatever_the_order() {
    let server = server(Mode::Events);
    let client = Arc::new(client(&server).await);
    let mut askers = Vec::new();
    for i in 0..32u32 {
        let client = Arc::clone(&client);
        askers.push(tokio::spawn(async move {
            let reply = client.request(Bytes::from(i.to_string())).await.unwrap();
            assert_eq!(reply, Bytes::from(format!("re:{i}")));
        }));
    }
    assert!(matches!(next_event(&server).await, Event::Connected(_)));
    let mut messages = Vec::new();
    while messages.len() < 32 {
        if let Event::Message(message) = next_event(&server).await {
            messages.push(message);
        }
    }
    // An unsolicited message in the middle must not be taken for a reply.
    messages[0]
        .conn
        .send(Bytes::from_static(b"unsolicited"))
        .await
        .unwrap();
    for message in messages.into_iter().rev() {
        let answer = format!("re:{}", String::from_utf8_lossy(&message.data));
        message.reply(Bytes::from(answer)).await.unwrap();
    }
    for asker in askers {
        tokio::time::timeout(LIMIT, asker).await.unwrap().unwrap();
    }
    assert_eq!(&client.recv().await.unwrap()[..], b"unsolicited");
}

#[tokio::test(flavor = "multi_thread")]
async fn recv_after_close_says_the_client_is_closed() {
    let server = server(Mode::Echo);
    let client = client(&server).await;
    client.close(LIMIT).await;
    assert!(client.is_closed());
    let Err(Error::Closed(info)) = client.recv().await else {
        panic!("recv on a closed client must fail")
    };
    assert!(info.reason.contains("create a new Client"), "{info}");
    let Err(Error::Closed(_)) = client.send(Bytes::from_static(b"x")).await else {
        panic!("send on a closed client must fail")
    };
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_sent_before_close_are_delivered() {
    let server = server(Mode::Events);
    let client = client(&server).await;
    for i in 0..100 {
        client.send(Bytes::from(format!("m{i}"))).await.unwrap();
    }
    client.close(LIMIT).await;
    let mut received = Vec::new();
    loop {
        match next_event(&server).await {
            Event::Message(message) => received.push(message.data),
            Event::Disconnected { reason, .. } => {
                assert_eq!(reason.code, Some(CloseCode::NORMAL));
                break;
            }
            _ => {}
        }
    }
    let expected: Vec<Bytes> = (0..100).map(|i| Bytes::from(format!("m{i}"))).collect();
    assert_eq!(received, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_breaks_the_protocol_ends_the_clients_connection_with_the_reason() {
    // A frame of an unknown type.
    let port = hand_written_server(&[0, 0, 0, 1, 0x7d]).await;
    let client = Client::connect("127.0.0.1", port, ClientConfig::default())
        .await
        .unwrap();
    let Err(Error::Closed(info)) = client.recv().await else {
        panic!("the connection must end")
    };
    assert_eq!(info.code, Some(CloseCode::PROTOCOL_ERROR));
    assert!(info.reason.contains("0x7d"), "{info}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frame_over_the_clients_max_frame_is_refused_with_its_size() {
    // Declares 1 MiB against the client's 1 KiB limit.
    let port = hand_written_server(&[0, 0x10, 0, 0, 0x01]).await;
    let config = ClientConfig {
        max_frame: 1024,
        ..ClientConfig::default()
    };
    let client = Client::connect("127.0.0.1", port, config).await.unwrap();
    let Err(Error::Closed(info)) = client.recv().await else {
        panic!("the connection must end")
    };
    assert_eq!(info.code, Some(CloseCode::FRAME_TOO_LARGE));
    assert!(
        info.reason
            .contains("1048576 bytes exceeds max_frame of 1024"),
        "{info}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pings_are_answered_natively() {
    let server = server(Mode::Events);
    let (mut peer, _) = HandPeer::connect(&server, 4096).await;
    peer.send(&Frame::Ping(99)).await;
    assert_eq!(peer.recv().await, Some(Frame::Pong(99)));
}

fn retrying(retries: u32) -> ClientConfig {
    ClientConfig {
        retries,
        backoff: Duration::from_millis(50),
        ..ClientConfig::default()
    }
}

fn echo_on(port: u16) -> _socketcomm::Server {
    common::server_with_addr(
        format!("127.0.0.1:{port}").parse().unwrap(),
        ServerConfig {
            mode: Mode::Echo,
            ..ServerConfig::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_with_retries_outlives_a_server_restart() {
    let first = echo_on(0);
    let port = first.local_addr().port();
    let client = Client::connect("127.0.0.1", port, retrying(10))
        .await
        .unwrap();
    assert_eq!(
        client.request(Bytes::from_static(b"one")).await.unwrap(),
        "one"
    );
    let before = client.local_addr();

    first.shutdown();
    first.wait_closed(LIMIT).await;
    drop(first);
    // The server comes back a little later, on the same port.
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let second = echo_on(port);
        tokio::time::sleep(LIMIT).await;
        drop(second);
    });
    let answer = tokio::time::timeout(LIMIT, client.request(Bytes::from_static(b"two")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "two");
    assert_ne!(client.local_addr(), before, "a new connection");
    assert!(!client.is_closed());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_retries_a_lost_connection_stays_lost_and_retries_run_out() {
    let server = echo_on(0);
    let port = server.local_addr().port();
    let client = Client::connect("127.0.0.1", port, ClientConfig::default())
        .await
        .unwrap();
    server.shutdown();
    server.wait_closed(LIMIT).await;
    let Err(Error::Closed(info)) = client.request(Bytes::from_static(b"x")).await else {
        panic!("the connection is gone")
    };
    assert_eq!(info.code, Some(CloseCode::GOING_AWAY));
    assert!(client.is_closed());

    // Nothing listens there now: three retries, then the OS error.
    let started = std::time::Instant::now();
    let Err(Error::Io { source, .. }) = Client::connect("127.0.0.1", port, retrying(3)).await
    else {
        panic!("nobody listens")
    };
    assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
    // 50 + 100 + 200 ms of backoff.
    assert!(started.elapsed() >= Duration::from_millis(350));
}

/// A client whose application does not read takes no more than `inbound_bytes` off the socket
/// (then TCP pushes back on the server), and loses nothing: every message arrives, in order,
/// once it reads.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_does_not_read_holds_at_most_its_inbound_bytes() {
    const MESSAGES: usize = 64;
    const SIZE: usize = 1 << 20;
    let server = server_with(ServerConfig {
        mode: Mode::Events,
        slow_reader: _socketcomm::config::SlowReader::Wait,
        ..ServerConfig::default()
    });
    let config = ClientConfig {
        inbound_bytes: SIZE,
        ..ClientConfig::default()
    };
    let port = server.local_addr().port();
    let client = Client::connect("127.0.0.1", port, config).await.unwrap();
    let Event::Connected(conn) = next_event(&server).await else {
        panic!("expected Connected")
    };
    let sending = tokio::spawn(async move {
        for i in 0..MESSAGES {
            conn.send(Bytes::from(vec![i as u8; SIZE])).await.unwrap();
        }
    });
    // Settled: the server has written what the client's socket and budget took.
    let mut written = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = server.stats().bytes_out;
        if now == written && now > 0 {
            break;
        }
        written = now;
    }
    // The two sockets' buffers hold some megabytes on loopback; without the budget the client
    // took all 64 MiB into its queue (which holds 1,024 messages).
    assert!(
        written < (MESSAGES * SIZE / 2) as u64,
        "the server wrote {written} bytes to a client that read nothing"
    );
    for i in 0..MESSAGES {
        let message = tokio::time::timeout(LIMIT, client.recv())
            .await
            .expect("a message in time")
            .unwrap();
        assert_eq!(message.len(), SIZE);
        assert!(
            message.iter().all(|&b| b == i as u8),
            "message {i} in order"
        );
    }
    tokio::time::timeout(LIMIT, sending).await.unwrap().unwrap();
}
