//! The bottom layer: what every other layer builds on, and which knows nothing of them.
//! Errors, the clock, the wire format, the libpq client, shared-memory signals, transaction
//! and identity helpers, this node's identity and its peers' policies.

pub mod canonical;
pub mod clock;
pub mod durable;
pub mod error;
pub mod kept;
pub mod locks;
pub mod node;
pub mod plans;
pub mod pq;
pub mod signals;
pub mod snapshot;
pub mod sqltext;
pub mod wire;
pub mod xact;
