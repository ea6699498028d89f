//! File transfer between our client and server, and against a hand-written peer that breaks the
//! rules: verified, atomic, resumable, and never writing outside the receiving folder.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use _socketcomm::frame::{Frame, ResumeToken, TransferStatus};
use _socketcomm::transfer::{Progress, PARTIAL_DIR};
use _socketcomm::{Client, ClientConfig, Error, Event, Mode, Server, ServerConfig};
use common::{client, next_event, server, server_with, HandPeer, LIMIT};

/// Bytes that differ in every position, from a seed (xorshift).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// The entries of `dir` a user would see: everything but the folder of files in progress.
fn visible(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != PARTIAL_DIR)
        .collect();
    names.sort();
    names
}

fn partials(dir: &Path) -> Vec<(String, u64)> {
    std::fs::read_dir(dir.join(PARTIAL_DIR))
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            (
                entry.file_name().to_string_lossy().into_owned(),
                entry.metadata().unwrap().len(),
            )
        })
        .collect()
}

fn uploading_server(upload_dir: &Path, max_file_size: Option<u64>) -> Server {
    let defaults = ServerConfig::default();
    server_with(ServerConfig {
        upload_dir: Some(upload_dir.to_owned()),
        max_file_size: max_file_size.unwrap_or(defaults.max_file_size),
        ..defaults
    })
}

async fn send(
    client: &Client,
    path: &Path,
    name: Option<&str>,
) -> Result<_socketcomm::transfer::SentFile, Error> {
    let progress = Arc::new(Progress::default());
    tokio::time::timeout(
        LIMIT,
        client.send_file(path, name.map(str::to_owned), &progress),
    )
    .await
    .expect("the transfer ends in time")
}

async fn next_file(server: &Server) -> _socketcomm::transfer::ReceivedFile {
    loop {
        if let Event::FileReceived { file, .. } = next_event(server).await {
            return file;
        }
    }
}

/// The status of a failed transfer.
fn status_of(result: Result<impl std::fmt::Debug, Error>) -> (TransferStatus, String) {
    match result {
        Err(Error::Transfer { status, reason, .. }) => (status, reason),
        other => panic!("expected a transfer error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_arrives_verified_and_in_place() {
    let source = tempfile::tempdir().unwrap();
    let uploads = tempfile::tempdir().unwrap();
    let data = pattern(3 * 1024 * 1024 + 17, 1);
    let path = write_file(source.path(), "video.bin", &data);
    let server = uploading_server(uploads.path(), None);
    let client = client(&server).await;

    let progress = Arc::new(Progress::default());
    let sent = client.send_file(&path, None, &progress).await.unwrap();
    let digest = *blake3::hash(&data).as_bytes();
    assert_eq!(sent.digest, digest);
    assert_eq!(sent.size, data.len() as u64);
    assert_eq!(
        (sent.name.as_str(), sent.saved_as.as_str()),
        ("video.bin", "video.bin")
    );
    assert_eq!(sent.resumed_from, 0);
    assert_eq!((progress.done(), progress.total()), (sent.size, sent.size));

    let file = next_file(&server).await;
    assert_eq!(file.digest, digest);
    assert_eq!(
        file.path,
        uploads.path().canonicalize().unwrap().join("video.bin")
    );
    assert_eq!(std::fs::read(&file.path).unwrap(), data);
    assert_eq!(file.peer, client.local_addr());
    assert_eq!(visible(uploads.path()), ["video.bin"]);
    assert!(partials(uploads.path()).is_empty());
    let stats = server.stats();
    assert_eq!(stats.files_received, 1);
    // File frames are not messages: none went either way.
    assert_eq!((stats.messages_in, stats.messages_out), (0, 0));
    assert!(stats.bytes_in > data.len() as u64);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_file_is_a_file_too() {
    let source = tempfile::tempdir().unwrap();
    let uploads = tempfile::tempdir().unwrap();
    let path = write_file(source.path(), "empty.txt", b"");
    let server = uploading_server(uploads.path(), None);
    let client = client(&server).await;
    let sent = send(&client, &path, None).await.unwrap();
    assert_eq!(sent.digest, *blake3::hash(b"").as_bytes());
    assert_eq!(
        std::fs::read(uploads.path().join("empty.txt")).unwrap(),
        b""
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_without_upload_dir_refuses_files() {
    let source = tempfile::tempdir().unwrap();
    let path = write_file(source.path(), "a.txt", b"hello");
    let server = server(Mode::Echo);
    let client = client(&server).await;
    let (status, reason) = status_of(send(&client, &path, None).await);
    assert_eq!(status, TransferStatus::REFUSED);
    assert!(reason.contains("upload_dir"), "{reason}");
    // The connection still works for messages.
    assert_eq!(
        client.request(Bytes::from_static(b"hi")).await.unwrap(),
        "hi"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_file_is_an_os_error_naming_it() {
    let uploads = tempfile::tempdir().unwrap();
    let server = uploading_server(uploads.path(), None);
    let client = client(&server).await;
    let missing = uploads.path().join("no-such-file");
    let Err(Error::Io {
        source, context, ..
    }) = send(&client, &missing, None).await
    else {
        panic!("a missing file cannot be sent")
    };
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    assert!(context.contains("no-such-file"), "{context}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_names_never_leave_the_folder() {
    let outer = tempfile::tempdir().unwrap();
    let uploads = outer.path().join("uploads");
    std::fs::create_dir(&uploads).unwrap();
    let server = uploading_server(&uploads, None);
    let (mut peer, _) = HandPeer::connect(&server, 1 << 20).await;

    let mut id = 0;
    let mut offer = |name: &str| {
        id += 1;
        (
            id,
            Frame::FileOffer {
                id,
                size: 3,
                resume: false,
                token: None,
                name: name.to_owned(),
            },
        )
    };
    // Reduced to a base name inside the folder.
    for hostile in ["../../escaped", "/tmp/absolute", "..\\..\\windows"] {
        let (id, frame) = offer(hostile);
        peer.send(&frame).await;
        let Some(Frame::FileAccept { offset: 0, .. }) = peer.recv().await else {
            panic!("{hostile:?} should be accepted under its base name")
        };
        peer.send(&Frame::FileChunk {
            id,
            data: Bytes::from_static(b"abc"),
        })
        .await;
        let digest = *blake3::hash(b"abc").as_bytes();
        peer.send(&Frame::FileEnd { id, digest }).await;
        let Some(Frame::FileResult { status, text, .. }) = peer.recv().await else {
            panic!("a verdict")
        };
        assert_eq!(status, TransferStatus::OK, "{text}");
        assert!(!text.contains('/') && !text.contains('\\'), "{text}");
    }
    // Refused outright.
    let long = "x".repeat(300);
    for hostile in ["a\0b", "..", "...", "", "dir/", &long, PARTIAL_DIR] {
        let (_, frame) = offer(hostile);
        peer.send(&frame).await;
        let Some(Frame::FileResult { status, text, .. }) = peer.recv().await else {
            panic!("a refusal")
        };
        assert_eq!(status, TransferStatus::BAD_NAME, "{hostile:?}: {text}");
    }
    assert_eq!(visible(&uploads), ["absolute", "escaped", "windows"]);
    assert_eq!(visible(outer.path()), ["uploads"]);
    assert_eq!(server.stats().transfers_failed, 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_over_max_file_size_is_refused_before_a_byte_is_written() {
    let source = tempfile::tempdir().unwrap();
    let uploads = tempfile::tempdir().unwrap();
    let path = write_file(source.path(), "big.bin", &pattern(5000, 2));
    let server = uploading_server(uploads.path(), Some(4096));
    let client = client(&server).await;
    let (status, reason) = status_of(send(&client, &path, None).await);
    assert_eq!(status, TransferStatus::TOO_LARGE);
    assert!(reason.contains("max_file_size"), "{reason}");
    assert!(visible(uploads.path()).is_empty());
    assert!(partials(uploads.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_larger_than_the_free_space_is_refused_before_a_byte_is_written() {
    let uploads = tempfile::tempdir().unwrap();
    let server = uploading_server(uploads.path(), Some(u64::MAX));
    let (mut peer, _) = HandPeer::connect(&server, 1 << 20).await;
    peer.send(&Frame::FileOffer {
        id: 1,
        size: u64::MAX / 2,
        resume: true,
        token: None,
        name: "huge.bin".into(),
    })
    .await;
    let Some(Frame::FileResult { status, text, .. }) = peer.recv().await else {
        panic!("a refusal")
    };
    assert_eq!(status, TransferStatus::NO_SPACE, "{text}");
    assert!(partials(uploads.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_digest_mismatch_keeps_nothing() {
    let uploads = tempfile::tempdir().unwrap();
    let server = uploading_server(uploads.path(), None);
    let (mut peer, _) = HandPeer::connect(&server, 1 << 20).await;
    peer.send(&Frame::FileOffer {
        id: 9,
        size: 4,
        resume: true,
        token: None,
        name: "x.txt".into(),
    })
    .await;
    assert!(matches!(
        peer.recv().await,
        Some(Frame::FileAccept { id: 9, .. })
    ));
    peer.send(&Frame::FileChunk {
        id: 9,
        data: Bytes::from_static(b"data"),
    })
    .await;
    peer.send(&Frame::FileEnd {
        id: 9,
        digest: *blake3::hash(b"DATA").as_bytes(),
    })
    .await;
    let Some(Frame::FileResult { status, text, .. }) = peer.recv().await else {
        panic!("a verdict")
    };
    assert_eq!(status, TransferStatus::DIGEST_MISMATCH);
    assert!(text.contains("nothing was kept"), "{text}");
    assert!(visible(uploads.path()).is_empty());
    assert!(partials(uploads.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn more_or_fewer_bytes_than_offered_fail_the_transfer() {
    let uploads = tempfile::tempdir().unwrap();
    let server = uploading_server(uploads.path(), None);
    let (mut peer, _) = HandPeer::connect(&server, 1 << 20).await;
    for (id, sent) in [(1, &b"toolong"[..]), (2, &b"ab"[..])] {
        peer.send(&Frame::FileOffer {
            id,
            size: 4,
            resume: false,
            token: None,
            name: "y".into(),
        })
        .await;
        assert!(matches!(peer.recv().await, Some(Frame::FileAccept { .. })));
        peer.send(&Frame::FileChunk {
            id,
            data: Bytes::copy_from_slice(sent),
        })
        .await;
        peer.send(&Frame::FileEnd {
            id,
            digest: *blake3::hash(sent).as_bytes(),
        })
        .await;
        let Some(Frame::FileResult { status, .. }) = peer.recv().await else {
            panic!("a verdict")
        };
        assert_eq!(status, TransferStatus::BAD_TRANSFER);
    }
    assert!(visible(uploads.path()).is_empty());
}

/// A sender that offers `name` (of `size` bytes), sends `sent`, and goes away; returns once the
/// server has noticed and holds those bytes as a partial file, out of sight, with the resume
/// token the server gave it.
async fn abandoned_upload(
    server: &Server,
    uploads: &Path,
    name: &str,
    size: u64,
    sent: &[u8],
) -> ResumeToken {
    let (mut peer, _) = HandPeer::connect(server, 1 << 20).await;
    peer.send(&offer(1, name, size, None)).await;
    let Some(Frame::FileAccept {
        offset: 0,
        token: Some(token),
        ..
    }) = peer.recv().await
    else {
        panic!("an accept from the start, with a token")
    };
    for part in sent.chunks(64 * 1024) {
        peer.send(&Frame::FileChunk {
            id: 1,
            data: Bytes::copy_from_slice(part),
        })
        .await;
    }
    drop(peer);
    wait_for_partials(uploads, |sizes| sizes.contains(&(sent.len() as u64))).await;
    assert!(visible(uploads).is_empty());
    token
}

/// An offer that allows resuming, with `token` if given.
fn offer(id: u32, name: &str, size: u64, token: Option<ResumeToken>) -> Frame {
    Frame::FileOffer {
        id,
        size,
        resume: true,
        token,
        name: name.into(),
    }
}

/// Sends `rest` as transfer 1's remaining chunks, then its end with the digest of `whole`;
/// returns the receiver's verdict.
async fn finish_upload(peer: &mut HandPeer, rest: &[u8], whole: &[u8]) -> TransferStatus {
    for part in rest.chunks(256 * 1024) {
        peer.send(&Frame::FileChunk {
            id: 1,
            data: Bytes::copy_from_slice(part),
        })
        .await;
    }
    peer.send(&Frame::FileEnd {
        id: 1,
        digest: *blake3::hash(whole).as_bytes(),
    })
    .await;
    let Some(Frame::FileResult { status, .. }) = peer.recv().await else {
        panic!("a verdict")
    };
    status
}

/// Waits until the sizes of the partial files (sorted) are as `wanted` says.
async fn wait_for_partials(uploads: &Path, wanted: impl Fn(&[u64]) -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let mut sizes: Vec<u64> = partials(uploads).iter().map(|(_, held)| *held).collect();
        sizes.sort_unstable();
        if wanted(&sizes) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sizes:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupted_uploads_keep_within_max_partial_bytes_oldest_going_first() {
    let uploads = tempfile::tempdir().unwrap();
    let server = server_with(ServerConfig {
        upload_dir: Some(uploads.path().to_owned()),
        max_partial_bytes: Some(1 << 20),
        ..ServerConfig::default()
    });
    let data = pattern(400 * 1024, 12);
    // 300 + 350 + 400 KiB is over 1 MiB: once the third is interrupted, the first goes.
    for (n, kib) in [300, 350, 400].into_iter().enumerate() {
        let held = &data[..kib * 1024];
        abandoned_upload(&server, uploads.path(), &format!("{n}.bin"), 1 << 30, held).await;
    }
    wait_for_partials(uploads.path(), |sizes| sizes == [350 * 1024, 400 * 1024]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_transfer_leaves_no_visible_file_and_resumes_with_its_token() {
    let uploads = tempfile::tempdir().unwrap();
    let data = pattern(1024 * 1024, 3);
    let server = uploading_server(uploads.path(), None);

    // A sender that goes away after 300 KiB.
    let held = 300 * 1024;
    let size = data.len() as u64;
    let token = abandoned_upload(&server, uploads.path(), "resume.bin", size, &data[..held]).await;

    // Another client offering the same name and size learns nothing of it and starts afresh.
    let (mut stranger, _) = HandPeer::connect(&server, 1 << 20).await;
    stranger.send(&offer(1, "resume.bin", size, None)).await;
    let Some(Frame::FileAccept {
        offset: 0,
        prefix,
        token: Some(theirs),
        ..
    }) = stranger.recv().await
    else {
        panic!("an accept from the start")
    };
    assert_eq!(prefix, [0; 32]);
    assert_ne!(theirs, token, "each sender gets a token of its own");
    drop(stranger);

    // The sender, with its token, continues after what is held.
    let (mut sender, _) = HandPeer::connect(&server, 1 << 20).await;
    sender
        .send(&offer(1, "resume.bin", size, Some(token)))
        .await;
    let Some(Frame::FileAccept {
        offset,
        prefix,
        token: again,
        ..
    }) = sender.recv().await
    else {
        panic!("an accept")
    };
    assert_eq!(offset, held as u64);
    assert_eq!(prefix, *blake3::hash(&data[..held]).as_bytes());
    assert_eq!(again, Some(token));
    assert_eq!(
        finish_upload(&mut sender, &data[held..], &data).await,
        TransferStatus::OK
    );
    assert_eq!(
        std::fs::read(uploads.path().join("resume.bin")).unwrap(),
        data
    );
    let file = next_file(&server).await;
    assert_eq!(file.resumed_from, held as u64);
    // The stranger's empty partial file went when it left; the resumed one once it arrived.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !partials(uploads.path()).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            partials(uploads.path())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server for files that reads slowly enough (small socket buffers) for a transfer to be
/// stopped in the middle, and a file of 48 MiB for it.
fn slow_upload(uploads: &Path, source: &Path, name: &str) -> (Server, Vec<u8>, PathBuf) {
    let defaults = ServerConfig::default();
    let server = server_with(ServerConfig {
        upload_dir: Some(uploads.to_owned()),
        socket: _socketcomm::config::SocketOptions {
            recv_buffer: Some(64 * 1024),
            ..defaults.socket.clone()
        },
        ..defaults
    });
    let data = pattern(1 << 20, 11).repeat(48);
    let path = write_file(source, name, &data);
    (server, data, path)
}

/// Starts sending `path` with `client` and stops (as a cancelled call does) once the server
/// holds more than `at_least` bytes of it; returns how many it held then (it goes on writing
/// what was on its way, and keeps it).
async fn stopped_upload(client: &Client, path: &Path, uploads: &Path, at_least: u64) -> u64 {
    let progress = Arc::new(Progress::default());
    let sending = client.send_file(path, None, &progress);
    let held = async {
        loop {
            if let Some(held) = partials(uploads).iter().map(|(_, held)| *held).max() {
                if held > at_least {
                    return held;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::select! {
        sent = sending => panic!("the transfer should have been stopped first: {sent:?}"),
        held = tokio::time::timeout(LIMIT, held) => held.expect("part of the file arrives in time"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stopped_sending_a_file_resumes_where_the_server_stopped() {
    let source = tempfile::tempdir().unwrap();
    let uploads = tempfile::tempdir().unwrap();
    let (server, data, path) = slow_upload(uploads.path(), source.path(), "big.bin");
    let client = client(&server).await;
    let held = stopped_upload(&client, &path, uploads.path(), 2 << 20).await;

    // Again on the same connection: the server lets go of the first transfer (told by the
    // sender's cancel, which waits for room in a queue full of chunks) and continues it.
    let sent = send(&client, &path, None).await.unwrap();
    assert!(sent.resumed_from >= held, "{} < {held}", sent.resumed_from);
    assert!(sent.resumed_from < data.len() as u64);
    assert_eq!(sent.digest, *blake3::hash(&data).as_bytes());
    assert_eq!(std::fs::read(uploads.path().join("big.bin")).unwrap(), data);
    assert_eq!(next_file(&server).await.resumed_from, sent.resumed_from);
    assert!(partials(uploads.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partial_file_with_other_content_is_not_resumed() {
    let source = tempfile::tempdir().unwrap();
    let uploads = tempfile::tempdir().unwrap();
    let (server, data, path) = slow_upload(uploads.path(), source.path(), "same-name.bin");
    let client = client(&server).await;
    stopped_upload(&client, &path, uploads.path(), 1 << 20).await;

    // What the server holds is spoilt (a disk error, a hand that edited it): its first byte.
    let (name, _) = partials(uploads.path()).remove(0);
    let partial = uploads.path().join(PARTIAL_DIR).join(name);
    let spoilt = std::fs::OpenOptions::new()
        .write(true)
        .open(&partial)
        .unwrap();
    std::os::unix::fs::FileExt::write_at(&spoilt, &[!data[0]], 0).unwrap();

    let sent = send(&client, &path, None).await.unwrap();
    assert_eq!(
        sent.resumed_from, 0,
        "what is held is not this file's start"
    );
    assert_eq!(
        std::fs::read(uploads.path().join("same-name.bin")).unwrap(),
        data
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_file_is_never_overwritten() {
    let source = tempfile::tempdir().unwrap();
    let uploads = tempfile::tempdir().unwrap();
    std::fs::write(uploads.path().join("notes.txt"), b"mine").unwrap();
    let server = uploading_server(uploads.path(), None);
    let client = client(&server).await;
    for (n, content) in [(1, &b"first"[..]), (2, &b"second"[..])] {
        let path = write_file(source.path(), "notes.txt", content);
        let sent = send(&client, &path, None).await.unwrap();
        assert_eq!(sent.saved_as, format!("notes ({n}).txt"));
    }
    assert_eq!(
        std::fs::read(uploads.path().join("notes.txt")).unwrap(),
        b"mine"
    );
    assert_eq!(
        std::fs::read(uploads.path().join("notes (2).txt")).unwrap(),
        b"second"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_sends_files_to_a_download_dir() {
    let source = tempfile::tempdir().unwrap();
    let downloads = tempfile::tempdir().unwrap();
    let data = pattern(700_000, 5);
    let path = write_file(source.path(), "report.pdf", &data);
    let server = server(Mode::Events);
    let port = server.local_addr().port();
    let config = ClientConfig {
        download_dir: Some(downloads.path().to_owned()),
        ..ClientConfig::default()
    };
    let client = Client::connect("127.0.0.1", port, config).await.unwrap();
    let Event::Connected(conn) = next_event(&server).await else {
        panic!("a connection")
    };
    let progress = Arc::new(Progress::default());
    let sent = server
        .send_file(conn.id(), &path, Some("renamed.pdf".into()), &progress)
        .await
        .unwrap();
    assert_eq!(sent.saved_as, "renamed.pdf");
    let file = tokio::time::timeout(LIMIT, client.recv_file())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(file.digest, sent.digest);
    assert_eq!(std::fs::read(&file.path).unwrap(), data);
    assert_eq!(server.stats().files_sent, 1);

    // A client without a download_dir refuses.
    let plain = common::client(&server).await;
    let Event::Connected(plain_conn) = next_event(&server).await else {
        panic!("a connection")
    };
    let refused = server
        .send_file(plain_conn.id(), &path, None, &progress)
        .await;
    assert_eq!(status_of(refused).0, TransferStatus::REFUSED);
    drop(plain);
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_keep_flowing_during_a_transfer_and_many_clients_upload_at_once() {
    let source = tempfile::tempdir().unwrap();
    let uploads = tempfile::tempdir().unwrap();
    let server = server_with(ServerConfig {
        mode: Mode::Echo,
        upload_dir: Some(uploads.path().to_owned()),
        ..ServerConfig::default()
    });
    let mut tasks = Vec::new();
    for n in 0..16u64 {
        let data = pattern(512 * 1024 + n as usize, 10 + n);
        let path = write_file(source.path(), &format!("file-{n}.bin"), &data);
        let client = Arc::new(client(&server).await);
        tasks.push(tokio::spawn(async move {
            let progress = Arc::new(Progress::default());
            let upload = {
                let client = Arc::clone(&client);
                let progress = Arc::clone(&progress);
                tokio::spawn(async move { client.send_file(&path, None, &progress).await })
            };
            // The same connection answers requests while its file is in flight.
            for i in 0..20u32 {
                let body = Bytes::from(format!("{n}:{i}"));
                assert_eq!(client.request(body.clone()).await.unwrap(), body);
            }
            let sent = upload.await.unwrap().unwrap();
            assert_eq!(sent.digest, *blake3::hash(&data).as_bytes());
        }));
    }
    for task in tasks {
        tokio::time::timeout(LIMIT, task).await.unwrap().unwrap();
    }
    assert_eq!(visible(uploads.path()).len(), 16);
    assert_eq!(server.stats().files_received, 16);
}

#[test]
fn a_missing_or_unwritable_upload_dir_fails_at_start_up() {
    let outer = tempfile::tempdir().unwrap();
    let missing = outer.path().join("missing");
    let config = ServerConfig {
        upload_dir: Some(missing.clone()),
        ..ServerConfig::default()
    };
    let Err(error) = Server::bind("127.0.0.1:0".parse().unwrap(), config) else {
        panic!("a missing folder cannot receive files")
    };
    let message = error.to_string();
    assert!(
        message.contains("upload_dir") && message.contains("missing"),
        "{message}"
    );

    let file = write_file(outer.path(), "a-file", b"");
    let config = ServerConfig {
        upload_dir: Some(file),
        ..ServerConfig::default()
    };
    let Err(error) = Server::bind("127.0.0.1:0".parse().unwrap(), config) else {
        panic!("a file is not a folder")
    };
    assert!(error.to_string().contains("not a folder"), "{error}");
}

/// A "server" that accepts a file and then reports that its digest did not match.
async fn mismatching_receiver() -> u16 {
    use _socketcomm::frame::{encode_frame, FrameCodec, Hello};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::Decoder;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut hello = [0u8; 12];
        stream.read_exact(&mut hello).await.unwrap();
        let offered = Hello::decode(&hello).unwrap();
        stream
            .write_all(&Hello::answer(&offered, 1 << 24).encode())
            .await
            .unwrap();
        let mut codec = FrameCodec::new(1 << 24);
        let mut buf = bytes::BytesMut::new();
        loop {
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                let answer = match frame {
                    Frame::FileOffer { id, .. } => Frame::FileAccept {
                        id,
                        offset: 0,
                        prefix: [0; 32],
                        token: None,
                    },
                    Frame::FileEnd { id, .. } => Frame::FileResult {
                        id,
                        status: TransferStatus::DIGEST_MISMATCH,
                        digest: [1; 32],
                        text: "the data that arrived has another digest; nothing was kept".into(),
                    },
                    _ => continue,
                };
                let mut out = bytes::BytesMut::new();
                encode_frame(&answer, &mut out);
                stream.write_all(&out).await.unwrap();
            }
            if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sender_learns_of_a_digest_mismatch_as_a_transfer_error() {
    let source = tempfile::tempdir().unwrap();
    let path = write_file(source.path(), "a.bin", &pattern(100_000, 9));
    let port = mismatching_receiver().await;
    let client = Client::connect("127.0.0.1", port, ClientConfig::default())
        .await
        .unwrap();
    let (status, reason) = status_of(send(&client, &path, None).await);
    assert_eq!(status, TransferStatus::DIGEST_MISMATCH);
    assert!(reason.contains("nothing was kept"), "{reason}");
}

/// Where the server keeps the partial file of `name` with `size` bytes for the sender holding
/// `token` (`receive.rs`'s key).
fn partial_path(uploads: &Path, name: &str, size: u64, token: &ResumeToken) -> PathBuf {
    let mut hasher = blake3::Hasher::new();
    hasher.update(name.as_bytes());
    hasher.update(&[0]);
    hasher.update(&size.to_be_bytes());
    hasher.update(token);
    let key: String = hasher.finalize().to_hex()[..32].to_owned();
    uploads.join(PARTIAL_DIR).join(format!("{key}.part"))
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn a_symbolic_link_planted_as_a_partial_file_is_never_followed() {
    let uploads = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let victim = write_file(
        elsewhere.path(),
        "victim.txt",
        b"precious, and 29 bytes long..",
    );
    let server = uploading_server(uploads.path(), None);
    let data = pattern(29, 7);
    // A local user who can write to upload_dir and sends files itself knows its own token,
    // hence where its own upload goes, and plants a link there.
    let token = abandoned_upload(&server, uploads.path(), "invoice.txt", 29, b"inv").await;
    let planted = partial_path(uploads.path(), "invoice.txt", 29, &token);
    assert!(planted.exists(), "the key is the one receive.rs uses");
    std::fs::remove_file(&planted).unwrap();
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let (mut peer, _) = HandPeer::connect(&server, 1 << 20).await;
    peer.send(&offer(1, "invoice.txt", 29, Some(token))).await;
    let Some(Frame::FileAccept { offset: 0, .. }) = peer.recv().await else {
        panic!("an accept from the start: nothing of the victim is revealed")
    };
    assert_eq!(
        finish_upload(&mut peer, &data, &data).await,
        TransferStatus::OK
    );
    let file = next_file(&server).await;
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"precious, and 29 bytes long.."
    );
    assert!(!std::fs::symlink_metadata(&file.path).unwrap().is_symlink());
    assert_eq!(std::fs::read(&file.path).unwrap(), data);
}

/// Offers `count` files (ids from `first`) on `peer` and returns how many were accepted and how
/// many refused as busy, with the reason of a refusal.
///
/// Names are distinct (`tag`): two transfers of one name and size would share a partial file.
async fn offer_many(
    peer: &mut HandPeer,
    tag: &str,
    first: u32,
    count: u32,
) -> (usize, usize, String) {
    for id in first..first + count {
        peer.send(&Frame::FileOffer {
            id,
            size: 10,
            resume: false,
            token: None,
            name: format!("offer-{tag}-{id}.bin"),
        })
        .await;
    }
    let (mut accepted, mut busy, mut reason) = (0, 0, String::new());
    for _ in 0..count {
        match peer.recv().await {
            Some(Frame::FileAccept { .. }) => accepted += 1,
            Some(Frame::FileResult { status, text, .. }) if status == TransferStatus::BUSY => {
                busy += 1;
                reason = text;
            }
            other => panic!("an answer to each offer, got {other:?}"),
        }
    }
    (accepted, busy, reason)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_offers_is_refused_as_busy_and_honest_uploads_go_on() {
    use _socketcomm::transfer::{MAX_TRANSFERS, MAX_TRANSFERS_PER_CONNECTION};
    let uploads = tempfile::tempdir().unwrap();
    let server = uploading_server(uploads.path(), None);
    // One connection: a few transfers at once, the rest refused at once (no thread, no file).
    let (mut flooder, _) = HandPeer::connect(&server, 1 << 20).await;
    let (accepted, busy, reason) = offer_many(&mut flooder, "flood", 1, 10).await;
    assert_eq!(
        (accepted, busy),
        (
            MAX_TRANSFERS_PER_CONNECTION,
            10 - MAX_TRANSFERS_PER_CONNECTION
        )
    );
    assert!(reason.contains("in progress"), "{reason}");
    // An honest client on another connection still uploads.
    let source_dir = tempfile::tempdir().unwrap();
    let source = write_file(source_dir.path(), "honest.txt", b"twelve bytes");
    let honest = client(&server).await;
    send(&honest, &source, None).await.unwrap();
    // Many connections together: at most MAX_TRANSFERS in all.
    let mut peers = Vec::new();
    let mut in_progress = MAX_TRANSFERS_PER_CONNECTION;
    while in_progress < MAX_TRANSFERS {
        let (mut peer, _) = HandPeer::connect(&server, 1 << 20).await;
        let wanted = (MAX_TRANSFERS - in_progress).min(MAX_TRANSFERS_PER_CONNECTION) as u32;
        let (accepted, busy, _) = offer_many(&mut peer, &peers.len().to_string(), 1, wanted).await;
        assert_eq!((accepted, busy), (wanted as usize, 0));
        in_progress += accepted;
        peers.push(peer);
    }
    let (mut one_more, _) = HandPeer::connect(&server, 1 << 20).await;
    let (accepted, busy, reason) = offer_many(&mut one_more, "more", 1, 1).await;
    assert_eq!((accepted, busy), (0, 1));
    assert!(reason.contains("into this folder"), "{reason}");
    // A transfer that ends gives its place back.
    flooder
        .send(&Frame::FileCancel {
            id: 1,
            reason: "changed my mind".into(),
        })
        .await;
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let (accepted, _, _) = offer_many(&mut one_more, "again", 100, 1).await;
        if accepted == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the place was never given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Transfers that wait for their data hold no thread: with a blocking pool of two threads,
/// eight offers whose data never comes are all accepted, and an honest upload still goes
/// through (each transfer used to keep a blocking thread until its data came).
#[test]
fn transfers_waiting_for_data_hold_no_thread() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let uploads = tempfile::tempdir().unwrap();
        let server = uploading_server(uploads.path(), None);
        let mut stalled = Vec::new();
        for n in 0..2 {
            let (mut peer, _) = HandPeer::connect(&server, 1 << 20).await;
            let (accepted, busy, _) = offer_many(&mut peer, &format!("stalled-{n}"), 1, 4).await;
            assert_eq!((accepted, busy), (4, 0));
            stalled.push(peer);
        }
        let source_dir = tempfile::tempdir().unwrap();
        let source = write_file(source_dir.path(), "honest.txt", b"twelve bytes");
        let honest = client(&server).await;
        send(&honest, &source, None).await.unwrap();
        assert_eq!(next_file(&server).await.name, "honest.txt");
    });
}
