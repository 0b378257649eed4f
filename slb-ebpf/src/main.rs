#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no `AtomicU64::fetch_add` (it lacks compare-and-swap), but
// LLVM lowers an add whose result is unused to the BPF `lock xadd` instruction.
#![feature(core_intrinsics)]
#![allow(internal_features)]

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
mod load;
mod maps;
mod packet;
mod pick;
mod policy;
mod replay;
mod tunnel;
mod words;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
