//! Environment variable names that more than one module reads or writes: a leaf module, so
//! the spawner (which scrubs them from workers' environments) and the upgrade (which sets
//! them for the new image) do not depend on each other.

/// The environment variable that carries the state's descriptor number into the new image.
pub const STATE_VAR: &str = "HERDSMAN_UPGRADE_STATE";
