//! The runtime layer: the peer endpoints (what other nodes call), the link client (what this
//! node calls on them), the replicator that drives every link, and the background workers.
//! The top layer: nothing imports it.

pub mod endpoints;
pub mod housekeeper;
pub mod join;
pub mod link;
pub mod replicator;
pub mod worker;
