//! Small mechanisms the driver's layers share: the per-volume operation guard and the named
//! fault points the crash tests use.

pub mod faults;
pub mod guard;
