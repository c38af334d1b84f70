//! The body of the agent's `PUT /v1/instances/{id}` (and what the brain
//! sends in `StartWork`): arbitrary bytes parsed as JSON into an
//! `InstanceSpec` and validated, as the agent does. What must hold: no
//! panic, and a spec that validates survives a JSON round trip unchanged
//! and still validates (what the agent stores in `spec.json` and reads
//! back at re-adoption).
#![no_main]

use corral_proto::InstanceSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice::<InstanceSpec>(data) else {
        return;
    };
    match spec.validate() {
        Ok(()) => {
            let json = serde_json::to_vec(&spec).expect("a valid spec serializes");
            let back: InstanceSpec =
                serde_json::from_slice(&json).expect("a serialized spec parses");
            assert_eq!(back, spec);
            assert!(back.validate().is_ok(), "a valid spec read back is valid");
        }
        Err(e) => assert!(!e.problems.is_empty(), "a refusal names a problem"),
    }
});
