//! The change log layer: capture of local changes, the log itself and its snapshot-bounded
//! batches, and the clocks of row versions. Uses only base.

pub mod capture;
pub mod changelog;
pub mod clocks;
pub mod retention;
pub mod spancache;
