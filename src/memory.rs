//! How the process gets memory back after a burst of large bodies.
//!
//! glibc's malloc serves a large allocation with its own mapping, but after such a mapping is
//! freed it raises that threshold to the freed size (up to 32 MiB): from then on, 15 MiB callback
//! bodies come from the heap, and a burst of them leaves the heap at its peak long after (measured:
//! 214 MiB resident after 24 concurrent 15 MiB bodies had all been answered). A fixed threshold
//! keeps every buffer of 1 MiB or more in a mapping of its own, unmapped when it is freed.

/// Allocations of at least this many bytes get a mapping of their own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 1024 * 1024;

/// Fixes malloc's mapping threshold (see the module). Call once, first thing in `main`.
pub fn return_large_buffers_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists, and a refusal (return value 0) leaves glibc's defaults, which are safe too.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
