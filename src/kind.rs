//! Names of backends and backend calls: a leaf module that both [`crate::error`] and
//! [`crate::vmm`] use, so that neither imports the other.

use std::fmt;

/// Which implementation a backend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum BackendKind {
    /// Linux memfd pages mapped into anonymous reservations.
    Host,
    /// CUDA driver virtual-memory management.
    Cuda,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Host => "host",
            BackendKind::Cuda => "cuda",
        })
    }
}

/// The kinds of backend call, for statistics and fault injection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum BackendOp {
    /// [`crate::vmm::Backend::reserve`]
    Reserve = 0,
    /// [`crate::vmm::Backend::free_reservation`]
    FreeReservation = 1,
    /// [`crate::vmm::Backend::create_page`]
    CreatePage = 2,
    /// [`crate::vmm::Backend::release_page`]
    ReleasePage = 3,
    /// [`crate::vmm::Backend::map`]
    Map = 4,
    /// [`crate::vmm::Backend::unmap`]
    Unmap = 5,
    /// [`crate::vmm::Backend::alloc_host`]
    AllocHost = 6,
    /// [`crate::vmm::Backend::free_host`]
    FreeHost = 7,
    /// [`crate::vmm::Backend::copy_async`] (submission and completion)
    Copy = 8,
    /// [`crate::vmm::Backend::synchronize`]
    Synchronize = 9,
}

impl BackendOp {
    /// Number of kinds.
    pub const COUNT: usize = 10;
    /// All kinds, in numeric order.
    pub const ALL: [BackendOp; Self::COUNT] = [
        BackendOp::Reserve,
        BackendOp::FreeReservation,
        BackendOp::CreatePage,
        BackendOp::ReleasePage,
        BackendOp::Map,
        BackendOp::Unmap,
        BackendOp::AllocHost,
        BackendOp::FreeHost,
        BackendOp::Copy,
        BackendOp::Synchronize,
    ];
    /// The snake_case name used in statistics and JSON.
    pub fn name(self) -> &'static str {
        match self {
            BackendOp::Reserve => "reserve",
            BackendOp::FreeReservation => "free_reservation",
            BackendOp::CreatePage => "create_page",
            BackendOp::ReleasePage => "release_page",
            BackendOp::Map => "map",
            BackendOp::Unmap => "unmap",
            BackendOp::AllocHost => "alloc_host",
            BackendOp::FreeHost => "free_host",
            BackendOp::Copy => "copy",
            BackendOp::Synchronize => "synchronize",
        }
    }
}

impl fmt::Display for BackendOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
