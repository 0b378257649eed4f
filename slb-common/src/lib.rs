//! Types shared by the XDP data plane and the `slb` control plane, and the pure logic both rely
//! on (flow hashing, checksums, the Maglev table) so it can be tested on the host.
#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod checksum;
pub mod hash;
#[cfg(feature = "alloc")]
pub mod maglev;
pub mod pinned;
pub mod types;
#[cfg(feature = "alloc")]
pub mod wire;

pub use types::*;
