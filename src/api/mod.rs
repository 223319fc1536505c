//! The SQL-callable functions an operator uses: each checks its arguments, calls the layer
//! below that does the work, and signals the worker. Uses every layer but runtime.

pub mod bucardo;
pub mod catalog;
pub mod cluster;
pub mod diff;
pub mod conflicts;
pub mod ddl;
pub mod exceptions;
pub mod join;
pub mod monitor;
pub mod sequences;
