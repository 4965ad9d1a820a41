//! The C ABI of kvvm: `extern "C"` functions over [`kvvm::KvCache`] and [`kvvm::SwapEngine`], DLPack export.
//!
//! The header `include/kvvm.h` is generated from this module by cbindgen (see `cbindgen.toml`
//! and `scripts/c-tests.sh`); the doc comments here are the header's documentation.
//!
//! # Conventions (after rustls-ffi)
//!
//! - **Handles** (`kvvm_cache`, `kvvm_swap`, `kvvm_ticket`) are small structs holding an id into a
//!   process-wide registry, not pointers. A null (id 0), destroyed or made-up handle gives
//!   [`kvvm_status::KVVM_STATUS_INVALID_HANDLE`], never undefined behaviour. Ids are never reused.
//! - Every function returns a [`kvvm_status`] (a `uint32_t` in C with stable values) and writes
//!   its results through out-pointers. Enumerations passed in (dtype, layout, backend, K/V) are
//!   plain integers, checked on input.
//! - A failing call stores a message in a thread-local buffer, read with [`kvvm_last_error`].
//! - Every export runs inside `catch_unwind`: a panic becomes [`kvvm_status::KVVM_STATUS_PANIC`],
//!   prints nothing on stderr, and leaves its message and location in `kvvm_last_error`.
//! - In a child process after `fork()`, handles made in the parent fail with
//!   `KVVM_STATUS_INVALID_ARGUMENT`, and freeing them only forgets them.
//! - Structs that may grow (`kvvm_config`, `kvvm_stats`, `kvvm_swap_config`) start with a
//!   `struct_size` field that the caller sets to `sizeof` the struct it was compiled with.
#![allow(non_camel_case_types)]

mod cache;
mod config;
pub mod dlpack;
mod error;
#[cfg(feature = "testing")]
pub mod fuzz;
mod registry;
mod status;
mod swap;
mod ticket;
mod types;

pub use cache::*;
pub use config::*;
pub use error::kvvm_last_error;
pub(crate) use error::{cstr, guard, out, to_usize, FfiError, FfiResult};
pub use status::*;
pub use swap::*;
pub use ticket::*;
pub use types::*;

/// Major version of the library (matches `Cargo.toml`).
pub const KVVM_VERSION_MAJOR: u32 = 0;
/// Minor version of the library (matches `Cargo.toml`).
pub const KVVM_VERSION_MINOR: u32 = 1;
/// Patch version of the library (matches `Cargo.toml`).
pub const KVVM_VERSION_PATCH: u32 = 0;

/// Pass as `slot` to `kvvm_cache_export_dlpack` to export the whole batch
/// `[max_slots, max_tokens, kv_heads, head_dim]`.
pub const KVVM_ALL_SLOTS: u32 = u32::MAX;

/// The library version as a NUL-terminated string (`"0.1.0"`), static storage.
///
/// Thread-safe.
#[no_mangle]
pub extern "C" fn kvvm_version() -> *const std::ffi::c_char {
    const V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}

#[cfg(test)]
mod tests {
    use std::ffi::{c_char, CStr};

    use kvvm::Error;

    use super::*;

    #[test]
    fn version_constants_match_the_manifest() {
        assert_eq!(
            KVVM_VERSION_MAJOR.to_string(),
            env!("CARGO_PKG_VERSION_MAJOR")
        );
        assert_eq!(
            KVVM_VERSION_MINOR.to_string(),
            env!("CARGO_PKG_VERSION_MINOR")
        );
        assert_eq!(
            KVVM_VERSION_PATCH.to_string(),
            env!("CARGO_PKG_VERSION_PATCH")
        );
        // SAFETY: kvvm_version returns a static NUL-terminated string.
        let v = unsafe { CStr::from_ptr(kvvm_version()) };
        assert_eq!(v.to_str().ok(), Some(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn panics_become_a_status_with_the_message() {
        let s = guard(|| panic!("boom {}", 42));
        assert_eq!(s, kvvm_status::KVVM_STATUS_PANIC);
        let mut buf = [0 as c_char; 64];
        // SAFETY: `buf` holds 64 bytes.
        let n = unsafe { kvvm_last_error(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: NUL-terminated by kvvm_last_error.
        let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
        assert!(msg.starts_with("internal panic: boom 42 (at "), "{msg}");
        assert!(msg.contains(".rs:"), "{msg}");
        assert_eq!(n, msg.len());
    }

    /// A panic caught at the boundary writes nothing on the host program's stderr (the message
    /// is in `kvvm_last_error`). Checked in a child process whose stderr is a pipe.
    #[test]
    fn panics_inside_the_boundary_print_nothing() {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` holds two ints for pipe() to fill.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only redirects stderr, runs the boundary and exits with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: plain descriptor calls on descriptors this process owns.
            unsafe {
                libc::dup2(fds[1], 2);
                libc::close(fds[0]);
            }
            let s = guard(|| panic!("quiet please"));
            let mut buf = [0 as c_char; 128];
            // SAFETY: `buf` holds 128 bytes.
            unsafe { kvvm_last_error(buf.as_mut_ptr(), buf.len()) };
            // SAFETY: NUL-terminated by kvvm_last_error.
            let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy();
            let ok = s == kvvm_status::KVVM_STATUS_PANIC && msg.contains("quiet please");
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        // SAFETY: closes the parent's copy of the write end.
        unsafe { libc::close(fds[1]) };
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            // SAFETY: `chunk` is valid for 4096 bytes.
            let n = unsafe { libc::read(fds[0], chunk.as_mut_ptr().cast(), chunk.len()) };
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n as usize]);
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{status}"
        );
        assert!(out.is_empty(), "stderr: {}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn errors_map_to_their_status() {
        let grow = Error::Grow {
            slot: kvvm::SlotId::new(1),
            missing_pages: 2,
            source: Box::new(Error::BudgetExhausted {
                needed: 2,
                available: 0,
                budget_bytes: 0,
                page_size: 1,
            }),
        };
        assert_eq!(
            kvvm_status::from_error(&grow),
            kvvm_status::KVVM_STATUS_BUDGET_EXHAUSTED
        );
        assert_eq!(
            kvvm_status::from_error(&Error::SlotsExhausted { max_slots: 1 }),
            kvvm_status::KVVM_STATUS_SLOTS_EXHAUSTED
        );
        assert_eq!(
            kvvm_status::from_error(&Error::Unsupported("x".into())),
            kvvm_status::KVVM_STATUS_UNSUPPORTED
        );
    }

    #[test]
    fn status_values_round_trip() {
        for v in 0..20u32 {
            if let Some(s) = kvvm_status::from_raw(v) {
                assert_eq!(s as u32, v);
            }
        }
        assert!(kvvm_status::from_raw(15).is_none());
    }
}
