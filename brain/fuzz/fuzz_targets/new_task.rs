//! The body of the brain's `POST /v1/tasks`: arbitrary bytes parsed as JSON
//! into a `NewTask` and turned into a pending `Task` (validated), as the API
//! does. What must hold for an accepted task: the instance spec the brain
//! will send is one a cell accepts, and it survives the store's JSON round
//! trip unchanged.
#![no_main]

use corral_brain::desired::{NewTask, Task, TaskId};
use corral_proto::{TenantId, Timestamp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut body) = serde_json::from_slice::<NewTask>(data) else {
        return;
    };
    let tenant = body
        .tenant
        .take()
        .unwrap_or_else(|| TenantId::new("fuzz").expect("a valid tenant"));
    let id = TaskId::from_entropy(0x0123_4567_89ab_cdef).expect("a task id");
    let now = Timestamp(1_700_000_000_000_000_000);
    let task = match body.into_task(id, tenant, now) {
        Err(p) => return assert!(!p.is_empty(), "a refusal names a problem"),
        Ok(t) => t,
    };
    if let Err(e) = task.instance_spec().validate() {
        panic!("task {} is valid but its instance is not: {e}", task.id);
    }
    let json = serde_json::to_vec(&task).expect("a task serializes");
    let back: Task = serde_json::from_slice(&json).expect("a stored task reads back");
    assert_eq!(back, task);
});
