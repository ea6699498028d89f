//! The load generator: `--conns` connections, each keeping `--depth` messages of `--size` bytes
//! in flight against an echo server (framed DATA frames, or raw bytes), for `--duration`
//! seconds after `--warmup`. Prints one JSON object: messages/s, MB/s, latency percentiles, and
//! the CPU time of this process and, with `--server-pid`, of the server over the same window.
//!
//! It runs on one thread, so that on a 2-core machine the server keeps the other core; its own
//! CPU use says when it, not the server, was the limit. With `--tls` every connection speaks
//! TLS 1.3 (any certificate is accepted: the peers are on loopback, made for the benchmark).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socketcomm_bench::{hello, stop_with_parent, CpuWindow, DATA, MAGIC, PING, PONG};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

struct Options {
    port: u16,
    conns: usize,
    size: usize,
    depth: usize,
    warmup: Duration,
    duration: Duration,
    raw: bool,
    tls: bool,
    server_pid: Option<String>,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let number = |name: &str, default: f64| value(name).map_or(default, |v| v.parse().unwrap());
    Options {
        port: number("--port", 0.0) as u16,
        conns: number("--conns", 50.0) as usize,
        size: number("--size", 1024.0) as usize,
        depth: number("--depth", 1.0) as usize,
        warmup: Duration::from_secs_f64(number("--warmup", 1.0)),
        duration: Duration::from_secs_f64(number("--duration", 5.0)),
        raw: args.iter().any(|a| a == "--raw"),
        tls: args.iter().any(|a| a == "--tls"),
        server_pid: value("--server-pid"),
    }
}

#[derive(Default)]
struct Tally {
    messages: u64,
    latencies_ns: Vec<u64>,
}

fn main() {
    stop_with_parent();
    let options = Arc::new(options());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(options));
}

async fn run(options: Arc<Options>) {
    let measuring = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = Vec::new();
    let connector = options.tls.then(socketcomm_bench::tls_connector);
    for _ in 0..options.conns {
        let stream = TcpStream::connect(("127.0.0.1", options.port))
            .await
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        let (options, measuring, tally) = (
            Arc::clone(&options),
            Arc::clone(&measuring),
            Arc::clone(&tally),
        );
        tasks.push(match &connector {
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let stream = connector
                    .connect(name, stream)
                    .await
                    .expect("TLS handshake");
                tokio::spawn(drive(stream, options, measuring, tally))
            }
            None => tokio::spawn(drive(stream, options, measuring, tally)),
        });
    }
    tokio::time::sleep(options.warmup).await;
    let server_pids: Vec<String> = options
        .server_pid
        .as_deref()
        .map(|pids| pids.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let cpu = CpuWindow::start(&server_pids);
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(options.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let used = cpu.used();
    for task in &tasks {
        task.abort();
    }
    let mut tally = tally.lock().unwrap();
    tally.latencies_ns.sort_unstable();
    let percentile = |p: f64| -> f64 {
        let all = &tally.latencies_ns;
        if all.is_empty() {
            return 0.0;
        }
        all[((all.len() - 1) as f64 * p) as usize] as f64 / 1000.0
    };
    let messages = tally.messages as f64;
    let json_or_null = |v: Option<f64>| v.map_or("null".to_owned(), |v| format!("{v:.4}"));
    println!(
        "{{\"messages\": {}, \"seconds\": {seconds:.3}, \"msgs_per_s\": {:.1}, \"mb_per_s\": {:.2}, \
         \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"loadgen_cpu_s\": {}, \"server_cpu_s\": {}, \"server_system_s\": {}}}",
        tally.messages,
        messages / seconds,
        messages * options.size as f64 / seconds / 1e6,
        percentile(0.50),
        percentile(0.99),
        json_or_null(used.own),
        json_or_null(used.server),
        json_or_null(used.server_system),
    );
}

/// Keeps `depth` messages in flight on one connection; echoes come back in order, so the send
/// times wait in a queue.
///
/// NOTE: reads and writes go on at once. A client that writes all it has before reading would
/// stop, with the server, once the messages in flight outgrow the two sockets' buffers (the
/// server's answers fill ours, so it stops reading, so our writes stop).
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    options: Arc<Options>,
    measuring: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) {
    let message = if options.raw {
        vec![b'x'; options.size]
    } else {
        let mut frame = Vec::with_capacity(5 + options.size);
        frame.extend_from_slice(&(1 + options.size as u32).to_be_bytes());
        frame.push(DATA);
        frame.resize(5 + options.size, b'x');
        frame
    };
    if !options.raw {
        stream.write_all(&hello()).await.unwrap();
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer[..4], MAGIC, "not a socketcomm server");
    }
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut sent_at = VecDeque::with_capacity(options.depth);
    let mut out = Vec::with_capacity(message.len() * options.depth);
    for _ in 0..options.depth {
        out.extend_from_slice(&message);
        sent_at.push_back(Instant::now());
    }
    let mut written = 0;
    let mut local = Tally::default();
    // Room for a whole batch of answers whatever the message size: a buffer no larger than
    // one message would fill up and the next read would return 0, as if the server had left.
    let mut buf = vec![0u8; (64 * 1024).max(2 * message.len() * options.depth)];
    let mut buffered = 0usize;
    loop {
        let n = tokio::select! {
            read = reader.read(&mut buf[buffered..]) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            wrote = writer.write(&out[written..]), if written < out.len() => {
                match wrote {
                    Ok(0) | Err(_) => return,
                    Ok(n) => written += n,
                }
                if written == out.len() {
                    out.clear();
                    written = 0;
                }
                continue;
            }
        };
        buffered += n;
        let (whole, used) = if options.raw {
            let whole = buffered / message.len();
            (whole, whole * message.len())
        } else {
            // A framed server also pings now and then: answered, and not counted.
            answers(&buf[..buffered], &mut out)
        };
        for _ in 0..whole {
            let started = sent_at.pop_front().expect("an echo for every message");
            if measuring.load(Ordering::Relaxed) {
                local.messages += 1;
                local.latencies_ns.push(started.elapsed().as_nanos() as u64);
            }
        }
        buf.copy_within(used..buffered, 0);
        buffered -= used;
        for _ in 0..whole {
            sent_at.push_back(Instant::now());
            out.extend_from_slice(&message);
        }
        if local.messages > 0 {
            let mut shared = tally.lock().unwrap();
            shared.messages += local.messages;
            shared.latencies_ns.append(&mut local.latencies_ns);
            local.messages = 0;
        }
    }
}

/// The whole frames at the start of `received`: how many are answers to our messages, and how
/// many bytes they take. A PING among them gets its PONG written to `out`.
fn answers(received: &[u8], out: &mut Vec<u8>) -> (usize, usize) {
    let (mut whole, mut used) = (0, 0);
    while let Some(header) = received.get(used..used + 5) {
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let Some(frame) = received.get(used..used + 4 + length) else {
            break;
        };
        if frame[4] == PING {
            out.extend_from_slice(frame);
            let pong = out.len() - frame.len() + 4;
            out[pong] = PONG;
        } else {
            whole += 1;
        }
        used += 4 + length;
    }
    (whole, used)
}
