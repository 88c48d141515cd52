//! The control plane: a unix socket in the supervisor and the commands people type
//! (`herdsman status | list | reload | scale | upgrade | metrics`).
//!
//! One request per connection, JSON lines both ways ([`protocol`]). The server turns requests
//! into [`crate::requests::Control`]s on the same queue signals use, so a `reload` from a
//! client and a `SIGHUP` are the same event; a waiting client gets progress lines and then the
//! roll-out's own outcome. Access is limited twice: the socket file is 0600 (0660 with a
//! `control_group`), and each connection's `SO_PEERCRED` is checked.

pub mod client;
pub mod logs_client;
pub mod logs_server;
pub mod paths;
pub(crate) use crate::protocol;
pub mod server;
pub mod table;
