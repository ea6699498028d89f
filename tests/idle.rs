//! What an idle connection costs the server on the heap, counted by a global allocator that
//! keeps the number of live bytes: no read buffer, no queue, only its task and its handle.
//!
//! One test in this binary, so that no other test allocates while it counts.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use _socketcomm::frame::{Hello, HELLO_LEN};
use _socketcomm::Mode;
use common::server;

/// The system allocator, counting the bytes it has handed out and not yet been given back.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; only the count is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

const CONNECTIONS: usize = 300;

/// A read buffer is 8 KiB (`READ_CHUNK`), a made outbound queue 2 KiB and the connection
/// loop's state while data flows about 1 KiB: an idle connection that held any of them would
/// cost more than this. (1,340-1,690 bytes now; uvloop's whole connection is about 1,300.)
const MOST_PER_CONNECTION: isize = 2 * 1024;

/// A connection parks after between one and two of the loop's quiet periods (500 ms).
const PARKED_AFTER: Duration = Duration::from_millis(1500);

/// Less than a quiet period: a framed client silent after its hello is parked at once.
const JUST_AFTER: Duration = Duration::from_millis(200);

/// Live heap bytes once the server's tasks have settled for `wait`.
async fn settled(wait: Duration) -> isize {
    tokio::time::sleep(wait).await;
    LIVE.load(Ordering::Relaxed)
}

/// Heap bytes per connection that `open` adds to a native echo server, `wait` after they fell
/// silent.
async fn per_connection(
    open: impl Fn(u16) -> TcpStream + Send + Copy + 'static,
    wait: Duration,
) -> isize {
    let server = server(Mode::Echo);
    let port = server.local_addr().port();
    // The events (Connected) are taken as an application would, not left queued.
    let events = server.events().clone();
    let taker = tokio::spawn(async move { while events.recv_async().await.is_ok() {} });
    let before = settled(wait).await;
    let held = tokio::task::spawn_blocking(move || {
        (0..CONNECTIONS).map(|_| open(port)).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let after = settled(wait).await;
    assert_eq!(server.stats().connections, CONNECTIONS as u64);
    drop(held);
    server.shutdown();
    taker.abort();
    (after - before) / CONNECTIONS as isize
}

/// A plain socket connected and silent: the server waits for its first byte.
fn silent(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).unwrap()
}

/// A framed client whose hello was answered, silent since.
fn greeted(port: u16) -> TcpStream {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.write_all(&Hello::client(16 << 20).encode()).unwrap();
    let mut answer = [0u8; HELLO_LEN];
    sock.read_exact(&mut answer).unwrap();
    Hello::decode(&answer).unwrap();
    sock
}

/// 64 KiB, so that the loop's buffers have grown to their largest before it goes quiet.
const MESSAGE: usize = 64 * 1024;

/// A plain socket that had a message echoed, silent since.
fn raw_after_a_message(port: u16) -> TcpStream {
    let mut sock = silent(port);
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.write_all(&[7u8; MESSAGE]).unwrap();
    let mut echoed = vec![0u8; MESSAGE];
    sock.read_exact(&mut echoed).unwrap();
    assert!(echoed.iter().all(|&b| b == 7));
    sock
}

/// A framed client that had a message echoed, silent since.
fn framed_after_a_message(port: u16) -> TcpStream {
    let mut sock = greeted(port);
    let mut frame = Vec::with_capacity(5 + MESSAGE);
    frame.extend_from_slice(&(1 + MESSAGE as u32).to_be_bytes());
    frame.push(_socketcomm::frame::kind::DATA);
    frame.extend_from_slice(&[9u8; MESSAGE]);
    sock.write_all(&frame).unwrap();
    let mut echoed = vec![0u8; frame.len()];
    sock.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, frame);
    sock
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_holds_no_buffer_no_queue_and_no_loop_state() {
    for (what, open, wait) in [
        (
            "waiting for its first byte",
            silent as fn(u16) -> TcpStream,
            PARKED_AFTER,
        ),
        ("framed and silent after its hello", greeted, PARKED_AFTER),
        ("framed, just after its hello", greeted, JUST_AFTER),
        (
            "raw and silent after a message",
            raw_after_a_message,
            PARKED_AFTER,
        ),
        (
            "framed and silent after a message",
            framed_after_a_message,
            PARKED_AFTER,
        ),
    ] {
        let bytes = per_connection(open, wait).await;
        println!("an idle connection {what}: {bytes} bytes of the server's heap");
        assert!(
            bytes < MOST_PER_CONNECTION,
            "an idle connection {what} holds {bytes} bytes of the server's heap"
        );
    }
}
