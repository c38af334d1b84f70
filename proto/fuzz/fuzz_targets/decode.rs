//! Feeds arbitrary bytes to the wire's `FrameDecoder`, in chunks whose size
//! the input chooses, and checks what must hold for any input: no panic, the
//! buffer bounded by the frame limit, and every decoded message surviving a
//! re-encode/decode round trip.
#![no_main]

use corral_proto::wire::{encode, FrameDecoder, WireError, LEN_PREFIX};
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer reaches the oversized-frame path easily.
const SMALL_MAX: usize = 512;

fuzz_target!(|data: &[u8]| {
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };
    // Low bits: the chunk size (1..=128), so the buffered path is exercised as
    // much as the whole-frame fast path. High bit: the frame limit.
    let chunk = usize::from(control & 0x7f) + 1;
    let mut dec = if control & 0x80 == 0 {
        FrameDecoder::new()
    } else {
        FrameDecoder::with_max_frame_len(SMALL_MAX)
    };
    let max = dec.max_frame_len();
    'feed: for piece in bytes.chunks(chunk) {
        let mut input = piece;
        loop {
            let result = dec.decode(&mut input);
            assert!(dec.buffered() <= LEN_PREFIX + max);
            assert!(dec.allocated() <= max);
            match result {
                Ok(Some(msg)) => {
                    let frame = encode(&msg).expect("a decoded message re-encodes");
                    let mut again = FrameDecoder::new();
                    let mut rest = &frame[..];
                    let back = again.decode(&mut rest).expect("re-encoded frame decodes");
                    assert_eq!(back.as_ref(), Some(&msg));
                    assert!(rest.is_empty());
                }
                Ok(None) => break,
                Err(WireError::FrameTooLarge { .. }) => break 'feed,
                Err(WireError::Malformed { .. } | WireError::TrailingBytes { .. }) => {}
                Err(e) => panic!("unexpected decode error: {e}"),
            }
        }
    }
    let _ = dec.finish();
});
