#![no_std]
#![no_main]

mod balancer;
mod balancer6;
mod floor;
mod forward;
mod fragments;
mod fragments6;
mod fullnat;
mod fullnat4;
mod half_open;
mod icmp;
mod icmp6;
mod maps;
mod packet;
mod policy;
mod replay;
mod tunnel;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
