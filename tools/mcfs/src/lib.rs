//! The library half of the `mcfs` command: a local cluster on one machine
//! ([`cluster`]), used by `mcfs cluster up/down/kill/start` and by the
//! integration tests, so users and tests run the very same thing.

pub mod cluster;
pub mod bench;
pub mod proc_util;
