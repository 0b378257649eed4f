//! The `slb-decap` object: the decapsulator a backend of a tunnelling DSR listener runs
//! (`slb decap`). An object of its own, so a backend loads none of the balancer's maps.
#![no_std]
#![no_main]

mod decap;
// Shared with the balancer, which uses all of it.
#[allow(dead_code)]
mod packet;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
