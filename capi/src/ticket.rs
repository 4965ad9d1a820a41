//! `kvvm_ticket`: one swap-out or swap-in in flight.

use static_assertions::assert_eq_size;

use crate::registry;
use crate::{guard, kvvm_status, out};

/// Handle of a swap ticket (one swap-out or swap-in in flight). `{0}` is the null handle.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct kvvm_ticket {
    /// Registry id (opaque).
    pub id: u64,
}

assert_eq_size!(kvvm_ticket, u64);

/// Writes 1 to `*done` once the transfer and its bookkeeping are complete, 0 while in flight.
/// Never blocks on the copy.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`; the transfer's own error if it failed (the slot
/// and host copy are then as they were before the swap).
///
/// # Safety
/// `done` is null or points to a writable `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_ticket_poll(ticket: kvvm_ticket, done: *mut u32) -> kvvm_status {
    guard(|| {
        let t = registry::get_ticket(ticket.id)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(done, "done") }?;
        *o = u32::from(t.poll()?);
        Ok(())
    })
}

/// Blocks until the transfer is complete.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`; the transfer's own error if it failed.
#[no_mangle]
pub extern "C" fn kvvm_ticket_wait(ticket: kvvm_ticket) -> kvvm_status {
    guard(|| Ok(registry::get_ticket(ticket.id)?.wait()?))
}

/// Writes the CUDA event (`CUevent`) recorded after the transfer's copy to `*event`, which a
/// stream can wait on with `cuStreamWaitEvent`; writes 0 on the host backend or when nothing was
/// copied. The event belongs to kvvm and is valid until the ticket is freed.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`.
///
/// # Safety
/// `event` is null or points to a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_ticket_event(ticket: kvvm_ticket, event: *mut u64) -> kvvm_status {
    guard(|| {
        let t = registry::get_ticket(ticket.id)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(event, "event") }?;
        *o = t.event().unwrap_or(0);
        Ok(())
    })
}

/// Makes the caller's CUDA stream `stream` (a `CUstream` as a plain integer, e.g. torch's
/// `stream.cuda_stream`; 0 is the legacy default stream) wait on the device for the transfer's
/// copies: kernels enqueued on it afterwards may use a swapped-in slot in stream order, without
/// the host waiting. Calls that change the slot still wait on the host until the ticket is
/// done. On the host backend (no streams) this waits for the copies.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`; a backend error (e.g. an invalid stream); on the host backend,
/// the transfer's own error.
#[no_mangle]
pub extern "C" fn kvvm_ticket_stream_wait(ticket: kvvm_ticket, stream: u64) -> kvvm_status {
    guard(|| Ok(registry::get_ticket(ticket.id)?.stream_wait(stream)?))
}

/// Writes the id of the host copy the transfer reads or writes to `*copy`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`.
///
/// # Safety
/// `copy` is null or points to a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_ticket_copy(ticket: kvvm_ticket, copy: *mut u64) -> kvvm_status {
    guard(|| {
        let t = registry::get_ticket(ticket.id)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(copy, "copy") }?;
        *o = t.copy().raw();
        Ok(())
    })
}

/// Writes the bytes the transfer copies to `*bytes`.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`, `KVVM_STATUS_NULL_POINTER`.
///
/// # Safety
/// `bytes` is null or points to a writable `uint64_t`.
#[no_mangle]
pub unsafe extern "C" fn kvvm_ticket_bytes(ticket: kvvm_ticket, bytes: *mut u64) -> kvvm_status {
    guard(|| {
        let t = registry::get_ticket(ticket.id)?;
        // SAFETY: per this function's contract.
        let o = unsafe { out(bytes, "bytes") }?;
        *o = t.bytes();
        Ok(())
    })
}

/// Frees a ticket handle. The transfer is not cancelled: the engine finishes it.
///
/// Thread-safe.
///
/// # Errors
/// `KVVM_STATUS_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn kvvm_ticket_free(ticket: kvvm_ticket) -> kvvm_status {
    guard(|| registry::remove_ticket(ticket.id))
}
