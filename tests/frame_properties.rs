//! Property tests of the codec, the hello and the sniffing: arbitrary input never panics or
//! over-allocates, and every frame survives any chunking of the stream.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tokio_util::codec::Decoder;

use _socketcomm::frame::{
    self, CloseCode, Frame, FrameCodec, Hello, Sniff, TransferStatus, HELLO_LEN, MAGIC,
};

const MAX_FRAME: u32 = 4096;

fn frame_strategy() -> impl Strategy<Value = Frame> {
    let body = proptest::collection::vec(any::<u8>(), 0..600).prop_map(Bytes::from);
    prop_oneof![
        body.clone().prop_map(Frame::Data),
        (any::<u32>(), body.clone()).prop_map(|(id, body)| Frame::Request { id, body }),
        (any::<u32>(), body.clone()).prop_map(|(id, body)| Frame::Reply { id, body }),
        any::<u64>().prop_map(Frame::Ping),
        any::<u64>().prop_map(Frame::Pong),
        (any::<u16>(), "[a-z ]{0,50}")
            .prop_map(|(code, reason)| Frame::close(CloseCode(code), &reason)),
        (
            any::<u32>(),
            any::<u64>(),
            any::<bool>(),
            any::<Option<[u8; 16]>>(),
            "\\PC{0,40}"
        )
            .prop_map(|(id, size, resume, token, name)| Frame::FileOffer {
                id,
                size,
                resume,
                token,
                name
            }),
        (
            any::<u32>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<Option<[u8; 16]>>()
        )
            .prop_map(|(id, offset, prefix, token)| Frame::FileAccept {
                id,
                offset,
                prefix,
                token
            }),
        (any::<u32>(), body.clone()).prop_map(|(id, data)| Frame::FileChunk { id, data }),
        (any::<u32>(), any::<[u8; 32]>()).prop_map(|(id, digest)| Frame::FileEnd { id, digest }),
        (
            any::<u32>(),
            any::<u16>(),
            any::<[u8; 32]>(),
            "[a-z ]{0,50}"
        )
            .prop_map(|(id, status, digest, text)| Frame::FileResult {
                id,
                status: TransferStatus(status),
                digest,
                text
            }),
        (any::<u32>(), "[a-z ]{0,50}").prop_map(|(id, reason)| Frame::FileCancel { id, reason }),
    ]
}

/// Feeds `wire` to a decoder in the given chunk sizes; returns the frames or the first error.
fn decode_in_chunks(wire: &[u8], chunks: &[usize]) -> Result<Vec<Frame>, String> {
    let mut codec = FrameCodec::new(MAX_FRAME);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut offset = 0;
    let mut sizes = chunks.iter().cycle();
    while offset < wire.len() {
        let size = (*sizes.next().unwrap_or(&1))
            .max(1)
            .min(wire.len() - offset);
        buf.extend_from_slice(&wire[offset..offset + size]);
        offset += size;
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            }
            // Room is reserved for at most one whole frame under max_frame.
            assert!(buf.capacity() <= 2 * (MAX_FRAME as usize + 4) + 64 * 1024);
        }
    }
    Ok(frames)
}

proptest! {
    #[test]
    fn frames_survive_any_chunking(
        frames in proptest::collection::vec(frame_strategy(), 1..20),
        chunks in proptest::collection::vec(1usize..300, 1..10),
    ) {
        let mut wire = BytesMut::new();
        for frame in &frames {
            frame::encode_frame(frame, &mut wire);
        }
        prop_assert_eq!(decode_in_chunks(&wire, &chunks), Ok(frames));
    }

    #[test]
    fn arbitrary_bytes_never_panic_nor_over_allocate(
        bytes in proptest::collection::vec(any::<u8>(), 0..5000),
        chunks in proptest::collection::vec(1usize..700, 1..10),
    ) {
        // Either frames or a clear error; the capacity bound is asserted inside.
        let _ = decode_in_chunks(&bytes, &chunks);
    }

    #[test]
    fn hostile_length_prefixes_are_refused_before_allocating(
        declared in (MAX_FRAME + 1)..=u32::MAX,
        rest in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut buf = BytesMut::with_capacity(32);
        buf.extend_from_slice(&declared.to_be_bytes());
        buf.extend_from_slice(&rest);
        let capacity = buf.capacity();
        let error = FrameCodec::new(MAX_FRAME).decode(&mut buf).unwrap_err();
        prop_assert!(error.to_string().contains("exceeds max_frame"));
        prop_assert_eq!(buf.capacity(), capacity);
    }

    #[test]
    fn any_hello_bytes_decode_or_are_refused(bytes in proptest::array::uniform12(any::<u8>())) {
        match Hello::decode(&bytes) {
            Ok(hello) => {
                prop_assert_eq!(&bytes[..4], &MAGIC[..]);
                prop_assert!(hello.min_version <= hello.max_version);
                prop_assert_eq!(Hello::decode(&hello.encode()).ok(), Some(hello));
            }
            Err(e) => prop_assert!(e.to_string().contains("bad hello")),
        }
    }

    #[test]
    fn sniffing_is_decided_by_the_first_differing_byte(
        bytes in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let verdict = frame::sniff(&bytes);
        let seen = bytes.len().min(4);
        if bytes[..seen] != MAGIC[..seen] {
            prop_assert_eq!(verdict, Sniff::Raw);
        } else if bytes.len() >= HELLO_LEN {
            prop_assert_eq!(verdict, Sniff::Framed);
        } else {
            prop_assert_eq!(verdict, Sniff::NeedMore);
        }
    }
}
