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

/// A read buffer is 8 KiB (`READ_CHUNK`) and a made outbound queue 2 KiB: an idle connection
/// that held either would cost more than this.
const MOST_PER_CONNECTION: isize = 4 * 1024;

/// Live heap bytes once the server's tasks have settled.
async fn settled() -> isize {
    tokio::time::sleep(Duration::from_millis(300)).await;
    LIVE.load(Ordering::Relaxed)
}

/// Heap bytes per connection that `open` adds to a native echo server, once they are idle.
async fn per_connection(open: impl Fn(u16) -> TcpStream + Send + Copy + 'static) -> isize {
    let server = server(Mode::Echo);
    let port = server.local_addr().port();
    let before = settled().await;
    let held = tokio::task::spawn_blocking(move || {
        (0..CONNECTIONS).map(|_| open(port)).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let after = settled().await;
    assert_eq!(server.stats().connections, CONNECTIONS as u64);
    drop(held);
    server.shutdown();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_holds_no_read_buffer_and_no_queue() {
    for (what, bytes) in [
        ("waiting for its first byte", per_connection(silent).await),
        (
            "framed and silent after its hello",
            per_connection(greeted).await,
        ),
    ] {
        println!("an idle connection {what}: {bytes} bytes of the server's heap");
        assert!(
            bytes < MOST_PER_CONNECTION,
            "an idle connection {what} holds {bytes} bytes of the server's heap"
        );
    }
}
