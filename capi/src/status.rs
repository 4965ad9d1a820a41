//! `kvvm_status`: the status every function returns. The enum below is the one table of
//! statuses: numeric conversion and names are derived from it.

use std::ffi::{c_char, CString};
use std::sync::OnceLock;

use kvvm::Error;
use strum::IntoEnumIterator;

/// Status of a call. Values are stable; new ones may be added. In C this is a `uint32_t`.
#[repr(u32)]
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, strum::FromRepr, strum::IntoStaticStr, strum::EnumIter,
)]
pub enum kvvm_status {
    /// Success.
    KVVM_STATUS_OK = 0,
    /// A required pointer argument was null.
    KVVM_STATUS_NULL_POINTER = 1,
    /// A handle was null, already destroyed, of another kind, or never issued.
    KVVM_STATUS_INVALID_HANDLE = 2,
    /// An argument was out of range or the object was in the wrong state for the call.
    KVVM_STATUS_INVALID_ARGUMENT = 3,
    /// A configuration that cannot work (including a `struct_size` that is not accepted).
    KVVM_STATUS_INVALID_CONFIG = 4,
    /// The physical page budget cannot supply the pages needed; nothing was changed.
    KVVM_STATUS_BUDGET_EXHAUSTED = 5,
    /// Every slot is allocated.
    KVVM_STATUS_SLOTS_EXHAUSTED = 6,
    /// The host (swap) memory budget cannot hold what was asked.
    KVVM_STATUS_HOST_BUDGET_EXHAUSTED = 7,
    /// The process ran out of memory mappings (`vm.max_map_count`, host backend).
    KVVM_STATUS_MAP_COUNT_EXHAUSTED = 8,
    /// A system or driver call failed.
    KVVM_STATUS_BACKEND_ERROR = 9,
    /// The CUDA driver could not be loaded or used.
    KVVM_STATUS_DRIVER_ERROR = 10,
    /// Not supported by this backend or build.
    KVVM_STATUS_UNSUPPORTED = 11,
    /// An output buffer was too small; the needed size was reported.
    KVVM_STATUS_BUFFER_TOO_SMALL = 12,
    /// A Rust panic was caught at the boundary; the object may be unusable.
    KVVM_STATUS_PANIC = 13,
    /// Any other error.
    KVVM_STATUS_INTERNAL = 14,
}

impl kvvm_status {
    /// The status with the numeric value `v`, if there is one.
    pub fn from_raw(v: u32) -> Option<Self> {
        Self::from_repr(v)
    }

    /// The status's name (`"KVVM_STATUS_OK"`, ...).
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// The status a kvvm error maps to.
    pub fn from_error(e: &Error) -> Self {
        use kvvm_status::*;
        match e {
            Error::Backend { .. } | Error::ThreadSpawn { .. } => KVVM_STATUS_BACKEND_ERROR,
            #[cfg(feature = "testing")]
            Error::Injected { .. } => KVVM_STATUS_BACKEND_ERROR,
            Error::Driver(_) => KVVM_STATUS_DRIVER_ERROR,
            Error::BudgetExhausted { .. } => KVVM_STATUS_BUDGET_EXHAUSTED,
            Error::MapCountExhausted { .. } => KVVM_STATUS_MAP_COUNT_EXHAUSTED,
            Error::HostBudgetExhausted { .. } => KVVM_STATUS_HOST_BUDGET_EXHAUSTED,
            Error::Grow { source, .. } => Self::from_error(source),
            Error::SlotsExhausted { .. } => KVVM_STATUS_SLOTS_EXHAUSTED,
            Error::InvalidConfig(_) => KVVM_STATUS_INVALID_CONFIG,
            Error::InvalidArgument(_)
            | Error::SlotOutOfRange { .. }
            | Error::SlotNotAllocated { .. }
            | Error::TokenNotLive { .. } => KVVM_STATUS_INVALID_ARGUMENT,
            Error::Unsupported(_) => KVVM_STATUS_UNSUPPORTED,
            Error::Internal(_) => KVVM_STATUS_INTERNAL,
            #[allow(unreachable_patterns)]
            _ => KVVM_STATUS_INTERNAL,
        }
    }
}

/// The statuses' names as C strings, in declaration order, made once.
fn c_names() -> &'static [(kvvm_status, CString)] {
    static NAMES: OnceLock<Vec<(kvvm_status, CString)>> = OnceLock::new();
    NAMES.get_or_init(|| {
        kvvm_status::iter()
            .filter_map(|s| CString::new(s.name()).ok().map(|c| (s, c)))
            .collect()
    })
}

/// The name of a status value (`"KVVM_STATUS_OK"`, ...), or `"KVVM_STATUS_UNKNOWN"` for a
/// value this library does not know. Static storage.
///
/// Thread-safe.
#[no_mangle]
pub extern "C" fn kvvm_status_name(status: u32) -> *const c_char {
    std::panic::catch_unwind(|| {
        kvvm_status::from_raw(status)
            .and_then(|s| c_names().iter().find(|(k, _)| *k == s))
            .map_or(c"KVVM_STATUS_UNKNOWN".as_ptr(), |(_, c)| c.as_ptr())
    })
    .unwrap_or(c"KVVM_STATUS_UNKNOWN".as_ptr())
}
