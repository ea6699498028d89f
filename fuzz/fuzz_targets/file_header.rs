//! The file-transfer frames on arbitrary bytes: the fields after a FILE_* type byte decode or
//! are refused without panicking, and an offered name is either refused or reduced to a base
//! name that cannot leave the receiving folder.
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

use _socketcomm::frame::{Frame, FrameCodec};
use _socketcomm::transfer::safe_name;

fuzz_target!(|input: &[u8]| {
    let Some((&kind, fields)) = input.split_first() else {
        return;
    };
    // One of the six file frame types, 0x10..=0x15.
    let kind = 0x10 + kind % 6;
    let mut buf = BytesMut::new();
    buf.put_u32(1 + fields.len() as u32);
    buf.put_u8(kind);
    buf.put_slice(fields);
    if let Ok(Some(Frame::FileOffer { name, .. })) = FrameCodec::new(1 << 20).decode(&mut buf) {
        if let Ok(safe) = safe_name(&name) {
            assert!(!safe.contains('/') && !safe.contains('\\') && !safe.contains('\0'));
            assert!(!safe.is_empty() && safe.chars().any(|c| c != '.'));
            assert!(safe.len() <= 255);
        }
    }
});
