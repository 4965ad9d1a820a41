//! The boundary: errors as a status and a thread-local message, the panic guard every export
//! runs in, and the pointer helpers.

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

use kvvm::Error;

use crate::kvvm_status;

/// An error at the boundary: a status and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FfiError {
    /// The status returned.
    pub status: kvvm_status,
    /// The message stored for `kvvm_last_error`.
    pub message: String,
}

impl FfiError {
    pub(crate) fn new(status: kvvm_status, message: impl Into<String>) -> Self {
        FfiError {
            status,
            message: message.into(),
        }
    }
    pub(crate) fn null(what: &str) -> Self {
        Self::new(
            kvvm_status::KVVM_STATUS_NULL_POINTER,
            format!("{what} must not be null"),
        )
    }
    pub(crate) fn arg(message: impl Into<String>) -> Self {
        Self::new(kvvm_status::KVVM_STATUS_INVALID_ARGUMENT, message)
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        FfiError::new(kvvm_status::from_error(&e), e.to_string())
    }
}

pub(crate) type FfiResult<T = ()> = std::result::Result<T, FfiError>;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn set_last_error(message: String) {
    LAST_ERROR.with(|l| *l.borrow_mut() = message);
}

thread_local! {
    /// How many boundary calls this thread is inside (the panic hook stays quiet then).
    static IN_BOUNDARY: Cell<u32> = const { Cell::new(0) };
    /// Where the last panic inside the boundary happened (kept for the error message).
    static PANIC_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs, once, a panic hook that prints nothing for a panic inside the boundary (the host
/// program's stderr is not kvvm's to write; the message goes to `kvvm_last_error`) and hands
/// every other panic to the hook that was there before.
fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_BOUNDARY.with(Cell::get) > 0 {
                let at = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()));
                PANIC_AT.with(|p| *p.borrow_mut() = at);
            } else {
                previous(info);
            }
        }));
    });
}

/// Leaves the boundary when dropped (also when unwinding).
struct Inside;

impl Inside {
    fn enter() -> Self {
        install_quiet_hook();
        IN_BOUNDARY.with(|d| d.set(d.get() + 1));
        Inside
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        IN_BOUNDARY.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Runs `f` inside the panic boundary, storing the message of a failure.
pub(crate) fn guard(f: impl FnOnce() -> FfiResult) -> kvvm_status {
    let inside = Inside::enter();
    let r = catch_unwind(AssertUnwindSafe(f));
    drop(inside);
    match r {
        Ok(Ok(())) => kvvm_status::KVVM_STATUS_OK,
        Ok(Err(e)) => {
            set_last_error(e.message);
            e.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let at = PANIC_AT.with(|p| p.borrow_mut().take());
            set_last_error(match at {
                Some(at) => format!("internal panic: {what} (at {at})"),
                None => format!("internal panic: {what}"),
            });
            kvvm_status::KVVM_STATUS_PANIC
        }
    }
}

/// A mutable reference from an out-pointer.
///
/// # Safety
/// `p` is null or valid for writes of a `T` for `'a`.
pub(crate) unsafe fn out<'a, T>(p: *mut T, what: &str) -> FfiResult<&'a mut T> {
    // SAFETY: the caller guarantees `p` is null or valid and aligned for writes.
    unsafe { p.as_mut() }.ok_or_else(|| FfiError::null(what))
}

/// A string argument.
///
/// # Safety
/// `p` is null or a NUL-terminated string.
pub(crate) unsafe fn cstr<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| FfiError::arg(format!("{what} is not valid UTF-8")))
}

pub(crate) fn to_usize(v: u64, what: &str) -> FfiResult<usize> {
    usize::try_from(v).map_err(|_| FfiError::arg(format!("{what} {v} is too large")))
}

/// Copies the message of the last failed call on this thread into `buf` (NUL-terminated,
/// truncated to `len - 1` bytes) and returns the full message length in bytes, without the NUL.
/// Call with `buf = NULL, len = 0` to learn the size. Returns 0 if no call on this thread
/// has failed yet. Successful calls do not clear the message.
///
/// Thread-safe (the message is per thread).
///
/// # Safety
/// `buf` is null or valid for writes of `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn kvvm_last_error(buf: *mut c_char, len: usize) -> usize {
    catch_unwind(|| {
        LAST_ERROR.with(|l| {
            let msg = l.borrow();
            if !buf.is_null() && len > 0 {
                let n = msg.len().min(len - 1);
                // SAFETY: `buf` is valid for `len` bytes and `n + 1 <= len`; the message is a
                // separate allocation, so the ranges do not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
                    *buf.add(n) = 0;
                }
            }
            msg.len()
        })
    })
    .unwrap_or(0)
}
