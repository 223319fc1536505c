//! Multi-node integration test harness for rbucardo.
//!
//! Tests run real PostgreSQL 15 servers (not pgrx's single in-process test
//! server) because replication bugs show up between nodes: partitions,
//! stalls, crashes mid-batch. Every link between two nodes goes through its
//! own fault-injecting TCP proxy, and everything is torn down when the
//! `Cluster` is dropped, pass or fail.

mod cluster;
mod node;
mod pg;
mod process;
mod proxy;
mod wait;

pub use cluster::{Cluster, ClusterBuilder};
pub use node::Node;
pub use pg::{Conn, Rows};
pub use process::process_alive;
pub use proxy::{Direction, Proxy};
pub use wait::{poll_every, wait_until, wait_until_every};
