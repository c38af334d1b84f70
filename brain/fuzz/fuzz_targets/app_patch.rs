//! The body of the brain's `PATCH /v1/apps/{name}`: arbitrary bytes parsed
//! as JSON into an `AppPatch` and applied to a valid app, as the API does.
//! What must hold for an accepted patch: the result validates, its
//! instance specs are ones a cell accepts, applying the same patch again
//! changes nothing, and its version moved by at most one.
#![no_main]

use corral_brain::desired::{AppPatch, NewApp};
use corral_proto::{TenantId, Timestamp};
use libfuzzer_sys::fuzz_target;

const BASE: &str = r#"{
    "name": "web", "instances": 2, "rootfs": "/var/lib/corral/rootfs/busybox",
    "command": ["/bin/httpd", "-f"], "env": {"PORT": "8080"},
    "resources": {"memory_mb": 64, "disk_mb": 64, "cpu_weight": 100, "max_pids": 64},
    "ports": [8080, {"port": 53, "protocol": "udp", "published": 30053}],
    "tags": ["ssd"]
}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(patch) = serde_json::from_slice::<AppPatch>(data) else {
        return;
    };
    let base: NewApp = serde_json::from_str(BASE).expect("the base app parses");
    let then = Timestamp(1_700_000_000_000_000_000);
    let now = Timestamp(1_700_000_001_000_000_000);
    let app = base
        .into_app(TenantId::new("acme").expect("a valid tenant"), then)
        .expect("the base app is valid");
    let new = match patch.apply(&app, now) {
        Err(p) => return assert!(!p.is_empty(), "a refusal names a problem"),
        Ok(None) => return,
        Ok(Some(new)) => new,
    };
    assert!(new.validate().is_ok());
    for index in [0, new.instances.saturating_sub(1)] {
        if let Err(e) = new.instance_spec(index).validate() {
            panic!("the patched app is valid but instance {index} is not: {e}");
        }
    }
    assert_eq!(patch.apply(&new, now), Ok(None), "a patch applies once");
    assert!(new.version == app.version || new.version == app.version + 1);
    assert_eq!((new.name, new.tenant), (app.name, app.tenant));
});
