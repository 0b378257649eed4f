#![no_std]
// The XDP programs live in the `slb` binary target (src/main.rs); this library target exists so
// slb-user can name this crate as a build dependency, as aya's template does.
