//! The fan-out benchmark's load generator: one publisher and many subscribers of one topic, in
//! one process, against a socketcomm server (framed protocol version 2: SUBSCRIBE and PUBLISH)
//! or against Redis itself (`--redis`: SUBSCRIBE and PUBLISH), so that the same program
//! measures both. The publisher stays at most `--window` messages ahead of the slowest
//! subscriber, so no queue grows without bound. Prints one JSON object: deliveries per
//! second, the publish rate, latency from publish to delivery, and CPU times.
//!
//!     fanout --port P [--publish-port Q] [--redis] --subscribers 100 --size 1024
//!            --messages 2000 [--server-pid PID[,PID...]]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socketcomm_bench::{stop_with_parent, CpuWindow, MAGIC, PING, PONG};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TOPIC: &str = "bench";
const SUBSCRIBE: u8 = 0x40;
const PUBLISH: u8 = 0x42;
const TOPIC_ACK: u8 = 0x43;

struct Args {
    port: u16,
    publish_port: u16,
    redis: bool,
    subscribers: usize,
    size: usize,
    messages: u64,
    window: u64,
    server_pids: Vec<String>,
}

fn args() -> Args {
    let all: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        all.iter()
            .position(|a| a == name)
            .and_then(|i| all.get(i + 1).cloned())
    };
    let number = |name: &str, default: u64| value(name).map_or(default, |v| v.parse().unwrap());
    let port = number("--port", 0) as u16;
    Args {
        port,
        publish_port: number("--publish-port", u64::from(port)) as u16,
        redis: all.iter().any(|a| a == "--redis"),
        subscribers: number("--subscribers", 100) as usize,
        size: number("--size", 1024) as usize,
        messages: number("--messages", 2000),
        window: number("--window", 64),
        server_pids: value("--server-pid")
            .map(|pids| pids.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
    }
}

/// What every subscriber records: how many messages it got, and each one's latency.
struct Received {
    count: AtomicU64,
    latencies: std::sync::Mutex<Vec<u64>>,
}

/// The payload of message `n`: its send time (nanoseconds since `base`) first.
fn payload(base: Instant, size: usize) -> Vec<u8> {
    let mut body = vec![0x61; size.max(8)];
    body[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_be_bytes());
    body
}

fn latency(base: Instant, body: &[u8]) -> u64 {
    let sent = u64::from_be_bytes(body[..8].try_into().unwrap());
    (base.elapsed().as_nanos() as u64).saturating_sub(sent)
}

/// A framed hello offering versions 1 to 2, with a 16 MiB frame limit.
fn hello_v2() -> [u8; 12] {
    let mut hello = [0u8; 12];
    hello[..4].copy_from_slice(&MAGIC);
    hello[4] = 1;
    hello[5] = 2;
    hello[8..].copy_from_slice(&(16u32 << 20).to_be_bytes());
    hello
}

async fn framed(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.set_nodelay(true).unwrap();
    stream.write_all(&hello_v2()).await.unwrap();
    let mut answer = [0u8; 12];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(
        answer[4..6],
        [2, 2],
        "the server must speak protocol version 2"
    );
    stream
}

async fn socketcomm_subscriber(
    port: u16,
    base: Instant,
    received: Arc<Received>,
    ready: Arc<AtomicU64>,
) {
    let stream = framed(port).await;
    let (read, mut write) = stream.into_split();
    let mut subscribe = Vec::new();
    subscribe.extend_from_slice(&((1 + 4 + TOPIC.len()) as u32).to_be_bytes());
    subscribe.push(SUBSCRIBE);
    subscribe.extend_from_slice(&1u32.to_be_bytes());
    subscribe.extend_from_slice(TOPIC.as_bytes());
    write.write_all(&subscribe).await.unwrap();
    let mut read = BufReader::with_capacity(256 * 1024, read);
    let mut frame = Vec::new();
    loop {
        let Ok(len) = read.read_u32().await else {
            return;
        };
        frame.resize(len as usize, 0);
        if read.read_exact(&mut frame).await.is_err() {
            return;
        }
        match frame[0] {
            TOPIC_ACK => {
                ready.fetch_add(1, Ordering::SeqCst);
            }
            PUBLISH => {
                let topic_len = usize::from(frame[1]);
                let body = &frame[2 + topic_len..];
                received.latencies.lock().unwrap().push(latency(base, body));
                received.count.fetch_add(1, Ordering::Release);
            }
            PING => {
                let mut pong = Vec::with_capacity(13);
                pong.extend_from_slice(&9u32.to_be_bytes());
                pong.push(PONG);
                pong.extend_from_slice(&frame[1..9]);
                write.write_all(&pong).await.unwrap();
            }
            _ => {}
        }
    }
}

async fn redis_subscriber(
    port: u16,
    base: Instant,
    received: Arc<Received>,
    ready: Arc<AtomicU64>,
) {
    use futures_util::StreamExt;
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0")).unwrap();
    let mut pubsub = client.get_async_pubsub().await.expect("subscribe to Redis");
    pubsub.subscribe(TOPIC).await.unwrap();
    ready.fetch_add(1, Ordering::SeqCst);
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let body: Vec<u8> = message.get_payload().unwrap();
        received
            .latencies
            .lock()
            .unwrap()
            .push(latency(base, &body));
        received.count.fetch_add(1, Ordering::Release);
    }
}

fn slowest(all: &[Arc<Received>]) -> u64 {
    all.iter()
        .map(|r| r.count.load(Ordering::Acquire))
        .min()
        .unwrap_or(0)
}

/// Publishes `messages`, staying at most `window` ahead of the slowest subscriber.
async fn publish(args: &Args, base: Instant, all: &[Arc<Received>]) {
    let paced = |sent: u64| async move {
        while sent >= slowest(all) + args.window {
            tokio::task::yield_now().await;
        }
    };
    if args.redis {
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{}/0", args.publish_port)).unwrap();
        let mut link = client.get_multiplexed_async_connection().await.unwrap();
        let mut sent = 0;
        while sent < args.messages {
            paced(sent).await;
            // A pipeline of up to 16: Redis answers each PUBLISH, and one at a time would
            // measure the round trip rather than the fan-out.
            let batch = (args.messages - sent).min(16).min(args.window);
            let mut pipe = redis::pipe();
            for _ in 0..batch {
                pipe.cmd("PUBLISH")
                    .arg(TOPIC)
                    .arg(payload(base, args.size))
                    .ignore();
            }
            let () = pipe.query_async(&mut link).await.unwrap();
            sent += batch;
        }
        return;
    }
    let mut stream = framed(args.publish_port).await;
    for sent in 0..args.messages {
        paced(sent).await;
        let body = payload(base, args.size);
        let mut frame = Vec::with_capacity(4 + 2 + TOPIC.len() + body.len());
        frame.extend_from_slice(&((1 + 1 + TOPIC.len() + body.len()) as u32).to_be_bytes());
        frame.push(PUBLISH);
        frame.push(TOPIC.len() as u8);
        frame.extend_from_slice(TOPIC.as_bytes());
        frame.extend_from_slice(&body);
        stream.write_all(&frame).await.unwrap();
    }
    // Kept open until every subscriber has everything (a close could drop the last ones).
    while slowest(all) < args.messages {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize] as f64 / 1000.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    stop_with_parent();
    let args = args();
    let base = Instant::now();
    let ready = Arc::new(AtomicU64::new(0));
    let all: Vec<Arc<Received>> = (0..args.subscribers)
        .map(|_| {
            Arc::new(Received {
                count: AtomicU64::new(0),
                latencies: std::sync::Mutex::new(Vec::new()),
            })
        })
        .collect();
    for received in &all {
        let (received, ready) = (Arc::clone(received), Arc::clone(&ready));
        if args.redis {
            tokio::spawn(redis_subscriber(args.port, base, received, ready));
        } else {
            tokio::spawn(socketcomm_subscriber(args.port, base, received, ready));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready.load(Ordering::SeqCst) < args.subscribers as u64 {
        assert!(
            Instant::now() < deadline,
            "the subscribers did not all subscribe"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A subscription made through one server reaches the other through Redis: a moment for it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu = CpuWindow::start(&args.server_pids);
    let started = Instant::now();
    let publishing = publish(&args, base, &all);
    tokio::time::timeout(Duration::from_secs(120), publishing)
        .await
        .expect("the run took more than 120 s");
    while slowest(&all) < args.messages {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "messages were lost"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let used = cpu.used();
    let mut latencies: Vec<u64> = all
        .iter()
        .flat_map(|r| std::mem::take(&mut *r.latencies.lock().unwrap()))
        .collect();
    latencies.sort_unstable();
    let deliveries = args.messages * args.subscribers as u64;
    let show = |v: Option<f64>| v.map_or("null".to_owned(), |v| format!("{v:.3}"));
    println!(
        "{{\"messages\": {}, \"subscribers\": {}, \"seconds\": {seconds:.3}, \
         \"deliveries_per_s\": {:.1}, \"published_per_s\": {:.1}, \"p50_us\": {:.1}, \
         \"p99_us\": {:.1}, \"loadgen_cpu_s\": {}, \"server_cpu_s\": {}}}",
        args.messages,
        args.subscribers,
        deliveries as f64 / seconds,
        args.messages as f64 / seconds,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        show(used.own),
        show(used.server),
    );
}
