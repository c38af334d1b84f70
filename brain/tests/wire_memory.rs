//! How much memory decoding hostile bytes costs. The brain faces every
//! cell's frames, so this lives with the brain; it needs a counting global
//! allocator, which the `unsafe`-free proto crate cannot host.
//!
//! The allocator counts per thread, so tests running in parallel do not see
//! each other's allocations.
// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use corral_proto::wire::{
    encode, FrameDecoder, InstanceEvent, InstanceEventKind, Message, RequestId, StartWork,
    StateSnapshot, LEN_PREFIX, MAX_FRAME_LEN, MAX_SNAPSHOT_INSTANCES,
};
use corral_proto::{InstanceId, InstanceInfo, InstanceSpec, Status, Timestamp};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

#[derive(Clone, Copy)]
struct Usage {
    armed: bool,
    live: isize,
    peak: isize,
}

thread_local! {
    // Const-initialised and without a destructor: usable from inside the
    // allocator without allocating.
    static USAGE: Cell<Usage> = const { Cell::new(Usage { armed: false, live: 0, peak: 0 }) };
}

fn track(delta: isize) {
    let _ = USAGE.try_with(|u| {
        let mut v = u.get();
        if v.armed {
            v.live += delta;
            v.peak = v.peak.max(v.live);
            u.set(v);
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// bookkeeping touches only a const thread-local and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Peak bytes allocated (net of frees) on this thread while `f` runs.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    USAGE.with(|u| {
        u.set(Usage {
            armed: true,
            live: 0,
            peak: 0,
        })
    });
    let out = f();
    let peak = USAGE.with(|u| {
        let v = u.get();
        u.set(Usage { armed: false, ..v });
        v.peak
    });
    (out, peak.max(0) as usize)
}

/// Decodes `bytes` fed in `chunk`-sized pieces, dropping each message as it
/// comes, as a connection handler would after acting on it.
fn drain(bytes: &[u8], chunk: usize) -> usize {
    let mut dec = FrameDecoder::new();
    let mut messages = 0;
    for piece in bytes.chunks(chunk.max(1)) {
        let mut input = piece;
        loop {
            match dec.decode(&mut input) {
                Ok(Some(_)) => messages += 1,
                Ok(None) => break,
                Err(corral_proto::wire::WireError::FrameTooLarge { .. }) => return messages,
                Err(_) => {}
            }
        }
    }
    messages
}

#[test]
fn a_lying_length_prefix_costs_only_the_bytes_that_arrived() {
    for declared in [u32::MAX, MAX_FRAME_LEN as u32, MAX_FRAME_LEN as u32 + 1] {
        let mut bytes = declared.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[7; 100]);
        let (_, peak) = peak_during(|| drain(&bytes, 13));
        assert!(peak <= 256, "declared {declared}: peak {peak} bytes");
    }
    // A vector length prefix lying inside a small frame: nothing is
    // preallocated beyond what the frame could hold.
    let mut payload = vec![2u8]; // Message::StateSnapshot
    payload.extend_from_slice(&[1, 0, 0, 0, 0]); // seq 1, capacity 0/0/0, not evacuating
    payload.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // "4 billion instances"
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    let (n, peak) = peak_during(|| drain(&frame, frame.len()));
    assert_eq!(n, 0);
    assert!(peak <= 256, "peak {peak} bytes");
}

/// A list inside a message whose length prefix lies: 600 arguments
/// claimed, with as many bytes after it (the decoder believes a length only
/// when that many bytes remain), but the first argument is longer than the
/// frame. serde's own `Vec` preallocated the 600 `String`s (14 KiB) on the
/// word of the prefix, found by the property test below (13.5 KiB for a
/// 318-byte input); the decoder's lists preallocate at most 64 elements.
#[test]
fn a_lying_list_length_inside_a_message_preallocates_little() {
    let msg = Message::StartWork(StartWork {
        request: RequestId(1),
        id: InstanceId::new("i").unwrap(),
        spec: spec(),
    });
    let frame = encode(&msg).unwrap();
    let payload = &frame[LEN_PREFIX..];
    // rootfs "/r", then the command: one argument, "x".
    let at = payload
        .windows(6)
        .position(|w| w == [2, b'/', b'r', 1, 1, b'x'])
        .expect("the command follows the rootfs");
    let mut lying = payload[..at + 3].to_vec();
    lying.extend_from_slice(&[0xd8, 0x04]); // varint 600
    lying.extend_from_slice(&[0xff, 0xff, 0x03]); // an argument of 65,535 bytes
    lying.extend_from_slice(&[b'y'; 600]);
    let mut bytes = (lying.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&lying);
    let (n, peak) = peak_during(|| drain(&bytes, bytes.len()));
    assert_eq!(n, 0, "the frame cannot decode");
    assert!(peak <= 4096, "peak {peak} bytes for {} bytes", bytes.len());
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // Integration tests have no lib.rs to put regressions beside.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Arbitrary bytes, including length prefixes anywhere up to u32::MAX,
    /// never cost more than one maximum frame.
    #[test]
    fn arbitrary_bytes_never_cost_more_than_a_frame(
        declared in prop_oneof![any::<u32>(), 0u32..4096, Just(MAX_FRAME_LEN as u32)],
        body in proptest::collection::vec(any::<u8>(), 0..16_384),
        chunk in 1usize..5000,
    ) {
        let mut bytes = declared.to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let (_, peak) = peak_during(|| drain(&bytes, chunk));
        prop_assert!(peak <= LEN_PREFIX + MAX_FRAME_LEN, "peak {} bytes", peak);
        // And in fact no more than a small multiple of what arrived.
        prop_assert!(peak <= 4 * bytes.len() + 4096, "peak {} for {} bytes", peak, bytes.len());
    }
}

fn spec() -> InstanceSpec {
    serde_json::from_str(
        r#"{"tenant":"a","app":"b","kind":"lrp","rootfs":"/r","command":["x"],"resources":{"memory_mb":8}}"#,
    )
    .unwrap()
}

/// The worst legitimate frames: the decoded message is bigger than its
/// frame, by a bounded factor. Measured and printed; the bound documents it.
#[test]
fn the_largest_valid_frames_expand_by_a_bounded_factor() {
    let id = InstanceId::new("i").unwrap();
    // A start whose command is as many one-byte arguments as fit: each is a
    // 24-byte String (+1 heap byte) in memory for 2 bytes on the wire.
    let mut s = spec();
    s.command = vec!["y".to_owned(); (MAX_FRAME_LEN - 64) / 2];
    let start = Message::StartWork(StartWork {
        request: RequestId(1),
        id: id.clone(),
        spec: s,
    });
    // A snapshot of the most instances allowed.
    let info = InstanceInfo::new(&id, &spec(), &Status::new());
    let snapshot = Message::StateSnapshot(StateSnapshot {
        seq: 1,
        available: Default::default(),
        evacuating: false,
        instances: vec![info; MAX_SNAPSHOT_INSTANCES],
    });
    let event = Message::Event(InstanceEvent {
        id,
        at: Timestamp::from_nanos(1),
        kind: InstanceEventKind::Crashed {
            reason: "z".repeat(MAX_FRAME_LEN - 64),
            exit_code: None,
        },
    });
    for (name, msg, factor) in [
        ("start-work", start, 32),
        ("state-snapshot", snapshot, 16),
        ("event", event, 3),
    ] {
        let frame = encode(&msg).unwrap();
        drop(msg);
        let (_, peak) = peak_during(|| drain(&frame, 64 << 10));
        eprintln!(
            "{name}: frame {} bytes, decoding peak {} bytes ({:.1}x)",
            frame.len(),
            peak,
            peak as f64 / frame.len() as f64
        );
        assert!(peak <= factor * frame.len(), "{name}: {peak} bytes");
    }
}
