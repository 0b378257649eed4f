//! Map keys and values compared and copied a 32-bit word at a time: a struct compare or copy
//! becomes a `memcmp` or `memcpy` call, which a BPF program cannot make. Both sides 4-byte
//! aligned, a whole number of words long.

/// Whether `held` (in a map value another CPU may write: read volatile) equals `wanted`,
/// stopping at the first word that differs (all at once, their registers spilled to the
/// stack).
#[inline(always)]
pub unsafe fn same<T>(held: *const T, wanted: *const T) -> bool {
    const { assert!(core::mem::size_of::<T>() % 4 == 0 && core::mem::align_of::<T>() >= 4) };
    let (held, wanted) = (held.cast::<u32>(), wanted.cast::<u32>());
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 4 {
        if unsafe { held.add(i).read_volatile() != wanted.add(i).read() } {
            return false;
        }
        i += 1;
    }
    true
}

/// Copies `from` into `to` with volatile stores.
#[inline(always)]
pub unsafe fn copy<T>(to: *mut T, from: *const T) {
    const { assert!(core::mem::size_of::<T>() % 4 == 0 && core::mem::align_of::<T>() >= 4) };
    let (to, from) = (to.cast::<u32>(), from.cast::<u32>());
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 4 {
        unsafe { to.add(i).write_volatile(from.add(i).read()) };
        i += 1;
    }
}
