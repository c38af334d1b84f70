//! The agent's config file: arbitrary text through the real
//! `Config::parse` (with fixed host facts). What must hold: no panic; a
//! refusal lists at least one problem; an accepted config keeps the
//! promises the rest of the agent relies on without checking again.
#![no_main]

use corral_agent::config::{Config, HostFacts};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let host = HostFacts {
        hostname: "fuzz-node".into(),
        memory_mb: 8192,
        disk_free_mb: 20_000,
    };
    match Config::parse(text, &host) {
        Err(problems) => assert!(!problems.is_empty(), "a refusal names a problem"),
        Ok(c) => {
            for p in [&c.data_dir, &c.run_dir, &c.api_socket, &c.layers_dir] {
                assert!(p.is_absolute(), "{} is relative", p.display());
            }
            assert!((1..=host.memory_mb).contains(&c.capacity.memory_mb));
            assert!(c.capacity.disk_mb > 0);
            assert!((1..=10_000).contains(&c.capacity.containers));
            assert!(c.api_listen.is_none() || c.api_listen != c.metrics_listen);
            if let Some(addr) = c.api_listen {
                assert!(
                    addr.ip().is_loopback() || c.api_token.is_some(),
                    "the TCP API on {addr} without a token"
                );
            }
            if !c.uplinks.is_empty() {
                assert!(c.subnet.is_some() && c.dataplane);
            }
            if let Some(b) = &c.brain {
                assert!(!b.addresses.is_empty());
            }
            assert!(!c.drain_on_stop || c.brain.is_some());
        }
    }
});
