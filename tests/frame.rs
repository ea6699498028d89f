//! The codec and the hello on their own: round trips, every split point, and hostile input.

use bytes::{BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use _socketcomm::frame::{
    self, CloseCode, Frame, FrameCodec, Hello, Sniff, TransferStatus, HELLO_LEN, MAGIC,
    MAX_CLOSE_REASON, MIN_MAX_FRAME, PROTOCOL_VERSION,
};
use _socketcomm::FrameError;

fn all_kinds() -> Vec<Frame> {
    vec![
        Frame::Data(Bytes::from_static(b"hello")),
        Frame::Data(Bytes::new()),
        Frame::Request {
            id: 7,
            body: Bytes::from_static(b"ping"),
        },
        Frame::Reply {
            id: u32::MAX,
            body: Bytes::from_static(b"pong"),
        },
        Frame::Ping(42),
        Frame::Pong(u64::MAX),
        Frame::Close {
            code: CloseCode::GOING_AWAY,
            reason: "server shutting down".into(),
        },
        Frame::FileOffer {
            id: 3,
            size: 1 << 40,
            resume: true,
            token: None,
            name: "vidéo.mp4".into(),
        },
        Frame::FileOffer {
            id: 4,
            size: 10,
            resume: true,
            token: Some([0xAB; 16]),
            name: "a.bin".into(),
        },
        Frame::FileAccept {
            id: 3,
            offset: 12345,
            prefix: [7; 32],
            token: None,
        },
        Frame::FileAccept {
            id: 4,
            offset: 0,
            prefix: [0; 32],
            token: Some([0xCD; 16]),
        },
        Frame::FileChunk {
            id: 3,
            data: Bytes::from_static(b"\x00\x01chunk"),
        },
        Frame::FileEnd {
            id: 3,
            digest: [9; 32],
        },
        Frame::FileResult {
            id: 3,
            status: TransferStatus::DIGEST_MISMATCH,
            digest: [0; 32],
            text: "nothing was kept".into(),
        },
        Frame::FileCancel {
            id: 3,
            reason: "stopped".into(),
        },
    ]
}

fn encode(frame: Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::new(1024).encode(frame, &mut buf).unwrap();
    buf
}

#[test]
fn every_frame_kind_round_trips() {
    for frame in all_kinds() {
        let mut buf = encode(frame.clone());
        assert_eq!(buf.len(), 4 + frame.encoded_len());
        let decoded = FrameCodec::new(1024).decode(&mut buf).unwrap();
        assert_eq!(decoded, Some(frame));
        assert!(buf.is_empty(), "the decoder consumed exactly one frame");
    }
}

#[test]
fn a_frame_split_at_every_byte_decodes_once_whole() {
    let mut wire = BytesMut::new();
    for frame in all_kinds() {
        wire.extend_from_slice(&encode(frame));
    }
    for split in 0..wire.len() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&wire[..split]);
        let mut decoded = Vec::new();
        while let Some(frame) = codec.decode(&mut buf).unwrap() {
            decoded.push(frame);
        }
        buf.extend_from_slice(&wire[split..]);
        while let Some(frame) = codec.decode(&mut buf).unwrap() {
            decoded.push(frame);
        }
        assert_eq!(decoded, all_kinds(), "split at byte {split}");
    }
}

#[test]
fn an_oversized_length_is_refused_before_any_allocation() {
    let mut buf = BytesMut::with_capacity(16);
    buf.put_u32(u32::MAX);
    buf.put_u8(0x01);
    let capacity = buf.capacity();
    let error = FrameCodec::new(1024).decode(&mut buf).unwrap_err();
    assert!(
        matches!(error, FrameError::TooLarge { size, max: 1024 } if size == u64::from(u32::MAX)),
        "{error}"
    );
    assert_eq!(
        buf.capacity(),
        capacity,
        "nothing was reserved for the frame"
    );
    assert_eq!(error.close_code(), CloseCode::FRAME_TOO_LARGE);
}

#[test]
fn room_for_a_frame_grows_with_what_arrives_not_with_what_it_declares() {
    // Five bytes that announce a 16 MiB frame used to reserve all 16 MiB at once.
    let declared = 16 << 20;
    let mut codec = FrameCodec::new(declared);
    let mut buf = BytesMut::new();
    buf.put_u32(declared);
    buf.put_u8(0x01);
    assert_eq!(codec.decode(&mut buf).unwrap(), None);
    assert!(
        buf.capacity() <= 128 * 1024,
        "reserved {} bytes",
        buf.capacity()
    );
    // As the frame really arrives, room grows with it, and the frame decodes whole.
    let body = vec![9u8; declared as usize - 1];
    let mut fed = 0;
    while fed < body.len() {
        let chunk = (body.len() - fed).min(100_000);
        buf.extend_from_slice(&body[fed..fed + chunk]);
        fed += chunk;
        let before = buf.len();
        let decoded = codec.decode(&mut buf).unwrap();
        if fed < body.len() {
            assert_eq!(decoded, None);
            // Proportional to what arrived (BytesMut's own growth doubles too), not 16 MiB.
            assert!(
                buf.capacity() <= 4 * before + 128 * 1024,
                "{}",
                buf.capacity()
            );
        } else {
            assert_eq!(decoded, Some(Frame::Data(Bytes::from(body.clone()))));
        }
    }
}

#[test]
fn a_frame_exactly_at_max_frame_is_accepted() {
    let frame = Frame::Data(Bytes::from(vec![7u8; 1023]));
    assert_eq!(frame.encoded_len(), 1024);
    let mut buf = encode(frame.clone());
    assert_eq!(FrameCodec::new(1024).decode(&mut buf).unwrap(), Some(frame));
    let mut buf = encode(Frame::Data(Bytes::from(vec![7u8; 1024])));
    assert!(FrameCodec::new(1024).decode(&mut buf).is_err());
}

#[test]
fn malformed_frames_are_refused_with_the_reason() {
    let cases: Vec<(&[u8], &str)> = vec![
        (&[0, 0, 0, 0], "length 0"),
        (&[0, 0, 0, 1, 0x7f], "unknown frame type 0x7f"),
        (&[0, 0, 0, 3, 0x02, 0, 0], "correlation id"),
        (&[0, 0, 0, 3, 0x20, 0, 0], "exactly 8 bytes"),
        (&[0, 0, 0, 2, 0x30, 3], "2-byte code"),
    ];
    for (bytes, expected) in cases {
        let mut buf = BytesMut::from(bytes);
        let error = FrameCodec::new(1024).decode(&mut buf).unwrap_err();
        assert!(
            error.to_string().contains(expected),
            "{bytes:?}: {error} should mention {expected:?}"
        );
        assert_eq!(error.close_code(), CloseCode::PROTOCOL_ERROR);
    }
}

#[test]
fn a_stream_that_ends_inside_a_frame_says_so() {
    let mut buf = BytesMut::from(&[0, 0, 0, 9, 0x01, b'a'][..]);
    let error = FrameCodec::new(1024).decode_eof(&mut buf).unwrap_err();
    assert!(matches!(error, FrameError::Truncated(6)), "{error}");
    assert_eq!(
        FrameCodec::new(1024)
            .decode_eof(&mut BytesMut::new())
            .unwrap(),
        None
    );
}

#[test]
fn a_close_reason_that_is_not_utf8_is_kept_readable() {
    let mut buf = BytesMut::from(&[0, 0, 0, 5, 0x30, 0x03, 0xe8, 0xff, b'!'][..]);
    let frame = FrameCodec::new(1024).decode(&mut buf).unwrap().unwrap();
    assert_eq!(
        frame,
        Frame::Close {
            code: CloseCode::NORMAL,
            reason: "\u{fffd}!".into()
        }
    );
}

#[test]
fn close_reasons_are_cut_at_a_character_boundary() {
    let long = "é".repeat(MAX_CLOSE_REASON);
    let Frame::Close { reason, .. } = Frame::close(CloseCode::NORMAL, &long) else {
        unreachable!()
    };
    assert!(reason.len() <= MAX_CLOSE_REASON);
    assert!(reason.chars().all(|c| c == 'é'));
    assert!(Frame::close(CloseCode::NORMAL, &long).encoded_len() <= MIN_MAX_FRAME as usize);
}

#[test]
fn hello_round_trips_and_negotiates() {
    let offered = Hello::client(4096);
    let bytes = offered.encode();
    assert_eq!(&bytes[..4], &MAGIC);
    assert_eq!(Hello::decode(&bytes).unwrap(), offered);

    let answer = Hello::answer(&offered, 2048);
    assert_eq!(answer.agreed_version(), Some(PROTOCOL_VERSION));
    assert_eq!(answer.max_frame, 2048);
    // A version-1 peer (`01 01`) is served in version 1, without topics.
    let version_1 = Hello {
        min_version: 1,
        max_version: 1,
        max_frame: 4096,
    };
    assert_eq!(Hello::answer(&version_1, 2048).agreed_version(), Some(1));
    assert_eq!((offered.min_version, offered.max_version), (1, 2));

    let from_the_future = Hello {
        min_version: PROTOCOL_VERSION + 1,
        max_version: PROTOCOL_VERSION + 3,
        max_frame: 4096,
    };
    let refusal = Hello::answer(&from_the_future, 2048);
    assert_eq!(refusal.agreed_version(), None);
    assert_eq!(refusal.max_version, PROTOCOL_VERSION, "says what it speaks");

    let spanning = Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION + 5,
        max_frame: 4096,
    };
    assert_eq!(
        Hello::answer(&spanning, 2048).agreed_version(),
        Some(PROTOCOL_VERSION),
        "a v2 client that still speaks v1 is served in v1"
    );
}

#[test]
fn broken_hellos_are_refused() {
    let mut bad_magic = Hello::client(4096).encode();
    bad_magic[1] = b'X';
    assert!(Hello::decode(&bad_magic).is_err());

    let mut empty_range = Hello::client(4096).encode();
    empty_range[4] = 3;
    empty_range[5] = 2;
    assert!(Hello::decode(&empty_range)
        .unwrap_err()
        .to_string()
        .contains("empty"));

    let tiny = Hello::client(MIN_MAX_FRAME - 1).encode();
    assert!(Hello::decode(&tiny)
        .unwrap_err()
        .to_string()
        .contains("max_frame"));
}

#[test]
fn sniffing_tells_plain_clients_at_their_first_byte() {
    assert_eq!(frame::sniff(b""), Sniff::NeedMore);
    assert_eq!(frame::sniff(b"H"), Sniff::Raw);
    assert_eq!(frame::sniff(b"Hello World"), Sniff::Raw);
    assert_eq!(frame::sniff(&MAGIC[..2]), Sniff::NeedMore);
    assert_eq!(frame::sniff(&[0x89, b'S', b'X']), Sniff::Raw);
    assert_eq!(frame::sniff(&MAGIC), Sniff::NeedMore);
    let hello = Hello::client(4096).encode();
    assert_eq!(frame::sniff(&hello[..HELLO_LEN - 1]), Sniff::NeedMore);
    assert_eq!(frame::sniff(&hello), Sniff::Framed);
}

#[test]
fn the_examples_in_docs_protocol_md_are_what_the_codec_writes() {
    let mut request = BytesMut::new();
    frame::encode_frame(
        &Frame::Request {
            id: 7,
            body: Bytes::from_static(b"ping"),
        },
        &mut request,
    );
    assert_eq!(
        &request[..],
        &[0, 0, 0, 9, 0x02, 0, 0, 0, 7, b'p', b'i', b'n', b'g']
    );
    assert_eq!(
        Hello::client(16 * 1024 * 1024).encode(),
        [0x89, 0x53, 0x43, 0x4D, 1, 2, 0, 0, 1, 0, 0, 0]
    );
    let topic_frames = [
        (
            Frame::Subscribe {
                id: 3,
                pattern: "chat.*".into(),
            },
            &[
                0, 0, 0, 0x0B, 0x40, 0, 0, 0, 3, b'c', b'h', b'a', b't', b'.', b'*',
            ][..],
        ),
        (
            Frame::Publish {
                topic: "chat.lobby".into(),
                body: Bytes::from_static(b"hi"),
            },
            &[
                0, 0, 0, 0x0E, 0x42, 10, b'c', b'h', b'a', b't', b'.', b'l', b'o', b'b', b'b',
                b'y', b'h', b'i',
            ][..],
        ),
        (
            Frame::TopicAck {
                id: 3,
                status: frame::TopicStatus::DONE,
                reason: String::new(),
            },
            &[0, 0, 0, 0x06, 0x43, 0, 0, 0, 3, 0][..],
        ),
    ];
    for (frame, bytes) in topic_frames {
        let mut out = BytesMut::new();
        frame::encode_frame(&frame, &mut out);
        assert_eq!(&out[..], bytes, "{frame:?}");
        let decoded = FrameCodec::new(1 << 20).decode(&mut out).unwrap();
        assert_eq!(decoded, Some(frame));
    }
    let mut close = BytesMut::new();
    frame::encode_frame(
        &Frame::close(CloseCode::NORMAL, "client closed"),
        &mut close,
    );
    assert_eq!(&close[..7], &[0, 0, 0, 0x10, 0x30, 0x03, 0xE8]);
    let mut offer = BytesMut::new();
    frame::encode_frame(
        &Frame::FileOffer {
            id: 1,
            size: 5,
            resume: true,
            token: None,
            name: "a.txt".into(),
        },
        &mut offer,
    );
    assert_eq!(
        &offer[..],
        &[
            0, 0, 0, 0x13, 0x10, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5, 1, b'a', b'.', b't', b'x',
            b't'
        ]
    );
    // The same offer resuming under a token: flags 0x03, the 16 token bytes before the name.
    let mut resuming = BytesMut::new();
    let token: [u8; 16] = std::array::from_fn(|n| n as u8);
    frame::encode_frame(
        &Frame::FileOffer {
            id: 1,
            size: 5,
            resume: true,
            token: Some(token),
            name: "a.txt".into(),
        },
        &mut resuming,
    );
    let mut expected = vec![0, 0, 0, 0x23, 0x10, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5, 3];
    expected.extend_from_slice(&token);
    expected.extend_from_slice(b"a.txt");
    assert_eq!(&resuming[..], &expected[..]);
    // An accept with its token: the 16 bytes after the prefix.
    let mut accept = BytesMut::new();
    frame::encode_frame(
        &Frame::FileAccept {
            id: 1,
            offset: 0,
            prefix: [0; 32],
            token: Some(token),
        },
        &mut accept,
    );
    assert_eq!(&accept[..5], &[0, 0, 0, 0x3D, 0x11]);
    assert_eq!(&accept[5 + 4 + 8 + 32..], &token);
}

#[test]
fn an_accept_without_a_token_is_one_from_a_receiver_that_predates_them() {
    // id 1, offset 0, a zero prefix: 45 bytes after the length, as version 1 first had it.
    let mut old = BytesMut::from(&[0, 0, 0, 45, 0x11, 0, 0, 0, 1][..]);
    old.extend_from_slice(&[0; 8 + 32]);
    let decoded = frame::FrameCodec::new(1 << 20).decode(&mut old).unwrap();
    assert_eq!(
        decoded,
        Some(Frame::FileAccept {
            id: 1,
            offset: 0,
            prefix: [0; 32],
            token: None
        })
    );
}

#[test]
fn an_offer_that_announces_a_token_it_lacks_is_malformed() {
    let mut short = BytesMut::from(&[0, 0, 0, 19, 0x10, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5, 3][..]);
    short.extend_from_slice(&[1; 5]);
    let error = frame::FrameCodec::new(1 << 20)
        .decode(&mut short)
        .unwrap_err();
    assert!(matches!(error, FrameError::Malformed(_)), "{error:?}");
}

#[test]
fn file_frames_shorter_than_their_fields_are_malformed() {
    for kind in [
        frame::kind::FILE_OFFER,
        frame::kind::FILE_ACCEPT,
        frame::kind::FILE_CHUNK,
        frame::kind::FILE_END,
        frame::kind::FILE_RESULT,
        frame::kind::FILE_CANCEL,
    ] {
        let mut buf = BytesMut::new();
        buf.put_u32(4);
        buf.put_u8(kind);
        buf.put_slice(&[0, 0, 1]);
        let error = FrameCodec::new(1024).decode(&mut buf).unwrap_err();
        assert!(
            matches!(error, FrameError::Malformed(_)),
            "{kind:#04x}: {error}"
        );
    }
    // A file name must be UTF-8.
    let mut buf = BytesMut::new();
    buf.put_u32(1 + 4 + 8 + 1 + 2);
    buf.put_u8(frame::kind::FILE_OFFER);
    buf.put_u32(1);
    buf.put_u64(10);
    buf.put_u8(0);
    buf.put_slice(&[0xff, 0xfe]);
    let error = FrameCodec::new(1024).decode(&mut buf).unwrap_err();
    assert!(error.to_string().contains("UTF-8"), "{error}");
}

#[test]
fn a_file_range_is_written_as_the_file_chunk_it_decodes_to() {
    use std::io::Write;
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(b"0123456789").unwrap();
    let range = Frame::FileRange {
        id: 5,
        range: frame::FileRange {
            file: std::sync::Arc::new(file),
            offset: 2,
            len: 6,
            guard: None,
        },
    };
    let mut wire = BytesMut::new();
    frame::encode_frame(&range, &mut wire);
    assert_eq!(wire.len(), 4 + range.encoded_len());
    let decoded = FrameCodec::new(1024).decode(&mut wire).unwrap();
    assert_eq!(
        decoded,
        Some(Frame::FileChunk {
            id: 5,
            data: Bytes::from_static(b"234567"),
        })
    );
}
