//! The body of `/v1/policies` on the brain (POST, DELETE) and on the agent
//! (PUT, DELETE): arbitrary bytes parsed as JSON into a `PolicyRule` and
//! validated. What must hold: no panic; a rule that validates survives a
//! JSON round trip unchanged, is not from a tenant to itself, and names a
//! port only with a protocol that has ports.
#![no_main]

use corral_proto::policy::PolicyRule;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(rule) = serde_json::from_slice::<PolicyRule>(data) else {
        return;
    };
    match rule.validate() {
        Ok(()) => {
            assert_ne!(rule.from, rule.to);
            assert!(rule.port == 0 || rule.protocol.has_ports());
            let json = serde_json::to_vec(&rule).expect("a valid rule serializes");
            let back: PolicyRule = serde_json::from_slice(&json).expect("a serialized rule parses");
            assert_eq!(back, rule);
            assert!(!rule.to_string().is_empty());
        }
        Err(problems) => assert!(!problems.is_empty(), "a refusal names a problem"),
    }
});
