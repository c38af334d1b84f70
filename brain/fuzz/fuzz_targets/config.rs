//! The brain's config file: arbitrary text through the real
//! `Config::parse`. What must hold: no panic; a refusal lists at least one
//! problem; an accepted config has an absolute data dir.
#![no_main]

use corral_brain::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, "fuzz-brain") {
        Err(problems) => assert!(!problems.is_empty(), "a refusal names a problem"),
        Ok(c) => {
            assert!(c.data_dir.is_absolute());
            for p in [&c.tls.ca, &c.tls.cert, &c.tls.key] {
                assert!(p.is_absolute(), "{} is relative", p.display());
            }
        }
    }
});
