//! Faults inside the core, injected on purpose (`cargo test --features fault-injection --test
//! faults`): a panic in one connection's task ends that connection alone.
#![cfg(feature = "fault-injection")]

mod common;

use bytes::Bytes;

use _socketcomm::{Error, Mode, ServerConfig, FAULT_PANIC};
use common::{client, next_disconnected, server_with};

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_in_a_connection_ends_that_connection_and_nothing_else() {
    let server = server_with(ServerConfig {
        mode: Mode::Echo,
        max_connections: 2,
        ..ServerConfig::default()
    });
    let bystander = client(&server).await;
    let victim = client(&server).await;
    victim.send(Bytes::from_static(FAULT_PANIC)).await.unwrap();
    let Err(Error::Closed(info)) = victim.recv().await else {
        panic!("the connection whose task panicked must end")
    };
    assert!(info.reason.contains("closed"), "{info}");

    // Its Disconnected event says why, and its slot is free again (max_connections is 2).
    let reason = next_disconnected(&server).await;
    assert!(reason.reason.contains("internal error"));
    assert_eq!(server.connections().len(), 1);
    assert_eq!(server.stats().connection_errors, 1);
    let newcomer = client(&server).await;
    for c in [&bystander, &newcomer] {
        assert_eq!(
            c.request(Bytes::from_static(b"alive")).await.unwrap(),
            "alive"
        );
    }
}
