//! Generated gRPC code for the three mcfs protocols (`proto/*.proto`) and the one
//! place where the cluster secret is attached to and checked on every call.
//!
//! * [`dlm`]: node daemons and tools -> `mcfs-dlm`.
//! * [`fence`]: `mcfs-dlm` and tools -> `mcfs-fenced`.
//! * [`node`]: tools -> each `mcfs-node` (read-only admin state).

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod dlm {
    tonic::include_proto!("mcfs.dlm");
}
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod fence {
    tonic::include_proto!("mcfs.fence");
}
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod node {
    tonic::include_proto!("mcfs.node");
}

pub mod auth;
