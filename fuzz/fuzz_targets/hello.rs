//! The handshake on arbitrary bytes: sniffing a connection's first bytes, decoding a hello and
//! answering it must never panic, and an answer is always a hello that decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;

use _socketcomm::frame::{sniff, Hello, HELLO_LEN};

fuzz_target!(|input: &[u8]| {
    let _ = sniff(input);
    let Ok(bytes) = <[u8; HELLO_LEN]>::try_from(input.get(..HELLO_LEN).unwrap_or(&[])) else {
        return;
    };
    if let Ok(offered) = Hello::decode(&bytes) {
        let answer = Hello::answer(&offered, 1 << 24);
        assert_eq!(Hello::decode(&answer.encode()).ok(), Some(answer));
    }
});
