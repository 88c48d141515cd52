//! PM2 compatibility for Node apps: `NODE_APP_INSTANCE`, the IPC channel (`process.send('ready')`
//! as readiness, PM2's `'shutdown'` message as the stop request). Real `node` processes.

// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;

use support::*;

#[test]
fn every_worker_gets_node_app_instance_equal_to_its_slot_and_a_non_node_worker_no_channel() {
    let dir = TempDir::new("instance");
    let h = Run::new(&dir, 3).start();
    h.wait_started();
    let seen = h.distinct_workers(3);
    let ids: BTreeSet<i64> = seen.iter().map(|v| v["worker_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, BTreeSet::from([0, 1, 2]));
    for v in &seen {
        assert_eq!(v["env"]["NODE_APP_INSTANCE"], v["worker_id"].to_string(), "{v}");
        // Not Node: no channel, no stray descriptor.
        assert!(v["env"].get("NODE_CHANNEL_FD").is_none(), "{v}");
        assert!(v["env"].get("NODE_CHANNEL_SERIALIZATION_MODE").is_none(), "{v}");
        assert_eq!(v["open_fds"], serde_json::json!([0, 1, 2, 3]), "stray fds: {v}");
    }
}
