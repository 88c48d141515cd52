//! Environment variable names that more than one module reads or writes: a leaf module, so
//! the spawner (which scrubs them from workers' environments) and the upgrade (which sets
//! them for the new image) do not depend on each other.

/// The environment variable that carries the state's descriptor number into the new image.
pub const STATE_VAR: &str = "HERDSMAN_UPGRADE_STATE";

/// Set to `1` by the shipped unit (`units/herdsman@.service`): herdsman, as the unit's main
/// process, keeps the workers in systemd's fd store so they outlive a crash, sweeps the
/// cgroup at start and spawns workers without `PR_SET_PDEATHSIG` (see `fdstore`). Any other
/// unit (one that does not set `KillMode=process` and `ExecStopPost=herdsman stop-post`)
/// leaves it unset and gets none of that.
pub const FD_STORE_VAR: &str = "HERDSMAN_FD_STORE";
