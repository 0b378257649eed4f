//! The slb control plane: config → desired state → reconcile into the XDP program's maps.

pub mod accept;
pub mod announce;
pub mod api;
pub mod applied;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod decap;
pub mod explain;
pub mod flows;
pub mod health;
pub mod instance;
pub mod links;
pub mod maps;
pub mod metrics;
pub mod proxy;
pub mod reconcile;
pub mod report;
pub mod snat;
pub mod status;
#[cfg(feature = "testbed")]
pub mod testbed;
