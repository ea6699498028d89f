//! The frame decoder on arbitrary bytes, fed in chunks whose sizes the input also chooses: it
//! must never panic, never buffer more than one frame within `max_frame` beyond what it was
//! given, and always either make progress or ask for more.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

use _socketcomm::frame::FrameCodec;

const MAX_FRAME: u32 = 64 * 1024;

fuzz_target!(|input: &[u8]| {
    let Some((&split, wire)) = input.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    let mut codec = FrameCodec::new(MAX_FRAME);
    let mut buf = BytesMut::new();
    for piece in wire.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(buf.len() < before, "a frame consumed nothing");
                    assert!(frame.encoded_len() <= MAX_FRAME as usize);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.capacity() <= wire.len() + 4 + MAX_FRAME as usize + 64 * 1024);
    }
    let _ = codec.decode_eof(&mut buf);
});
