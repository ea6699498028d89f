//! Rooms on the server: publish reaches the members of a room, each once, patterns included, and
//! a connection leaves its rooms when it ends.

mod common;

use std::time::Duration;

use bytes::Bytes;

use _socketcomm::{Error, Event, Mode};
use common::{client, next_disconnected, next_event, server, LIMIT};

/// Connects a client and returns it with its connection id on the server.
async fn member(server: &_socketcomm::Server) -> (_socketcomm::Client, u64) {
    let client = client(server).await;
    let Event::Connected(conn) = next_event(server).await else {
        panic!("expected Connected")
    };
    (client, conn.id())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_reaches_each_matching_member_once() {
    let server = server(Mode::Events);
    let (exact, exact_id) = member(&server).await;
    let (one, one_id) = member(&server).await;
    let (rest, rest_id) = member(&server).await;
    let (outside, outside_id) = member(&server).await;
    assert!(server.join(exact_id, "chat.lobby").unwrap());
    assert!(server.join(exact_id, "chat.*").unwrap());
    assert!(!server.join(exact_id, "chat.*").unwrap(), "already in it");
    server.join(one_id, "chat.*").unwrap();
    server.join(rest_id, "chat.>").unwrap();
    server.join(outside_id, "kitchen").unwrap();

    let reached = server
        .publish("chat.lobby", Bytes::from_static(b"hi"), &[])
        .await
        .unwrap();
    assert_eq!(reached, 3);
    let reached = server
        .publish("chat.lobby.2", Bytes::from_static(b"deeper"), &[])
        .await
        .unwrap();
    assert_eq!(reached, 1);
    let reached = server
        .publish("chat.lobby", Bytes::from_static(b"not one"), &[one_id])
        .await
        .unwrap();
    assert_eq!(reached, 2);

    assert_eq!(&exact.recv().await.unwrap()[..], b"hi");
    assert_eq!(&exact.recv().await.unwrap()[..], b"not one");
    assert_eq!(&one.recv().await.unwrap()[..], b"hi");
    for expected in [&b"hi"[..], b"deeper", b"not one"] {
        assert_eq!(&rest.recv().await.unwrap()[..], expected);
    }
    for quiet in [&one, &outside] {
        assert!(
            tokio::time::timeout(Duration::from_millis(200), quiet.recv())
                .await
                .is_err(),
            "nothing more arrives"
        );
    }
    assert!(matches!(
        server.publish("chat.*", Bytes::new(), &[]).await,
        Err(Error::Topic(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_that_ends_leaves_its_rooms() {
    let server = server(Mode::Events);
    let (staying, staying_id) = member(&server).await;
    let (leaving, leaving_id) = member(&server).await;
    for id in [staying_id, leaving_id] {
        server.join(id, "lobby").unwrap();
        server.join(id, "chat.>").unwrap();
    }
    assert_eq!(server.stats().rooms, 2);
    leaving.close(LIMIT).await;
    next_disconnected(&server).await;
    assert_eq!(server.members("lobby").unwrap(), vec![staying_id]);
    assert_eq!(server.members("chat.x").unwrap(), vec![staying_id]);
    assert!(server.rooms(leaving_id).is_empty());
    assert!(matches!(
        server.join(leaving_id, "lobby"),
        Err(Error::Closed(_))
    ));

    staying.close(LIMIT).await;
    tokio::time::timeout(LIMIT, next_disconnected(&server))
        .await
        .unwrap();
    assert_eq!(server.stats().rooms, 0, "rooms without members are gone");
}
