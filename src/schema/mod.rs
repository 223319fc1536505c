//! The schema layer: DDL capture and herd membership, collision-free sequences. Uses base, log
//! and apply (the DDL runner tells the event triggers when a replicated command runs).

pub mod ddl;
pub mod digest;
pub mod herd;
pub mod sequences;
