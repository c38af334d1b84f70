//! The body of the brain's `POST /v1/apps`: arbitrary bytes parsed as JSON
//! into a `NewApp` and turned into an `App` (validated), as the API does.
//! What must hold for an accepted app: every instance spec the brain will
//! send for it is one a cell accepts (`InstanceSpec::validate`), it
//! survives the store's JSON round trip unchanged, and an empty patch
//! changes nothing.
#![no_main]

use corral_brain::desired::{App, AppPatch, NewApp};
use corral_proto::{TenantId, Timestamp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut body) = serde_json::from_slice::<NewApp>(data) else {
        return;
    };
    let tenant = body
        .tenant
        .take()
        .unwrap_or_else(|| TenantId::new("fuzz").expect("a valid tenant"));
    let now = Timestamp(1_700_000_000_000_000_000);
    let Ok(app) = body
        .into_app(tenant, now)
        .map_err(|p| assert!(!p.is_empty()))
    else {
        return;
    };
    for index in [0, app.instances.saturating_sub(1)] {
        if let Err(e) = app.instance_spec(index).validate() {
            panic!("app {} is valid but instance {index} is not: {e}", app.name);
        }
    }
    let json = serde_json::to_vec(&app).expect("an app serializes");
    let back: App = serde_json::from_slice(&json).expect("a stored app reads back");
    assert_eq!(back, app);
    assert_eq!(AppPatch::default().apply(&app, now), Ok(None));
});
