//! [`DriverError`]: every way a call into the CUDA driver or NVRTC can fail.

use crate::types::CUresult;

/// An error from loading or calling the CUDA driver (or NVRTC).
///
/// Cheap to clone and comparable, so that it can be stored inside other error types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// A driver call returned something other than `CUDA_SUCCESS`.
    #[error("{function} failed: {name} ({code}): {description}")]
    Call {
        /// The `CUresult` the call returned.
        code: CUresult,
        /// The driver's name for it (`cuGetErrorName`, else [`error_name`], else
        /// `CUDA_ERROR_<code>`).
        name: String,
        /// The driver's description (`cuGetErrorString`), or a placeholder.
        description: String,
        /// The driver entry point that failed, e.g. `cuMemCreate`.
        function: &'static str,
    },
    /// None of the candidate files for a library could be opened.
    #[error("could not load the {library} library: tried {}; {message}", tried.join(", "))]
    LibraryNotFound {
        /// Which library: `"CUDA driver"` or `"NVRTC"`.
        library: &'static str,
        /// Every file name or path that was tried, in order.
        tried: Vec<String>,
        /// The dynamic loader's error for each candidate.
        message: String,
    },
    /// The library loaded but lacks an entry point kvvm needs (e.g. a driver too old, or a file
    /// that is not the expected library).
    #[error("symbol {symbol} is missing from {path}: {message}")]
    SymbolMissing {
        /// The symbol that was looked up.
        symbol: &'static str,
        /// The library file it was looked up in.
        path: String,
        /// The dynamic loader's error.
        message: String,
    },
    /// An NVRTC call returned something other than `NVRTC_SUCCESS`.
    #[error("{function} failed: {name} ({code})")]
    Nvrtc {
        /// The `nvrtcResult` the call returned.
        code: i32,
        /// NVRTC's name for it (`nvrtcGetErrorString`).
        name: String,
        /// The NVRTC entry point that failed.
        function: &'static str,
    },
    /// NVRTC could not compile a program; `log` is its compiler output.
    #[error("NVRTC could not compile {program}: {name} ({code})\n{log}")]
    Compile {
        /// The program name given to `nvrtcCreateProgram`.
        program: String,
        /// The `nvrtcResult` of `nvrtcCompileProgram`.
        code: i32,
        /// NVRTC's name for it.
        name: String,
        /// The program log (compiler diagnostics).
        log: String,
    },
    /// An argument could not be passed to the library (e.g. a string with an interior NUL, a
    /// size that does not fit the C type).
    #[error("invalid argument to {function}: {message}")]
    InvalidArgument {
        /// The entry point the argument was meant for.
        function: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

impl DriverError {
    /// The `CUresult` of a failed driver call; `None` for the other variants.
    pub fn code(&self) -> Option<CUresult> {
        match self {
            DriverError::Call { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True when the driver reported `CUDA_ERROR_OUT_OF_MEMORY`.
    pub fn is_out_of_memory(&self) -> bool {
        self.code() == Some(crate::types::CUDA_ERROR_OUT_OF_MEMORY)
    }
}

/// The `cuda.h` name of a `CUresult` (CUDA 12.6's `cudaError_enum`), without calling the driver.
///
/// Used when `cuGetErrorName` is unavailable or fails; `None` for codes this table does not know.
pub fn error_name(code: CUresult) -> Option<&'static str> {
    let name = match code {
        0 => "CUDA_SUCCESS",
        1 => "CUDA_ERROR_INVALID_VALUE",
        2 => "CUDA_ERROR_OUT_OF_MEMORY",
        3 => "CUDA_ERROR_NOT_INITIALIZED",
        4 => "CUDA_ERROR_DEINITIALIZED",
        5 => "CUDA_ERROR_PROFILER_DISABLED",
        6 => "CUDA_ERROR_PROFILER_NOT_INITIALIZED",
        7 => "CUDA_ERROR_PROFILER_ALREADY_STARTED",
        8 => "CUDA_ERROR_PROFILER_ALREADY_STOPPED",
        34 => "CUDA_ERROR_STUB_LIBRARY",
        46 => "CUDA_ERROR_DEVICE_UNAVAILABLE",
        100 => "CUDA_ERROR_NO_DEVICE",
        101 => "CUDA_ERROR_INVALID_DEVICE",
        102 => "CUDA_ERROR_DEVICE_NOT_LICENSED",
        200 => "CUDA_ERROR_INVALID_IMAGE",
        201 => "CUDA_ERROR_INVALID_CONTEXT",
        202 => "CUDA_ERROR_CONTEXT_ALREADY_CURRENT",
        205 => "CUDA_ERROR_MAP_FAILED",
        206 => "CUDA_ERROR_UNMAP_FAILED",
        207 => "CUDA_ERROR_ARRAY_IS_MAPPED",
        208 => "CUDA_ERROR_ALREADY_MAPPED",
        209 => "CUDA_ERROR_NO_BINARY_FOR_GPU",
        210 => "CUDA_ERROR_ALREADY_ACQUIRED",
        211 => "CUDA_ERROR_NOT_MAPPED",
        212 => "CUDA_ERROR_NOT_MAPPED_AS_ARRAY",
        213 => "CUDA_ERROR_NOT_MAPPED_AS_POINTER",
        214 => "CUDA_ERROR_ECC_UNCORRECTABLE",
        215 => "CUDA_ERROR_UNSUPPORTED_LIMIT",
        216 => "CUDA_ERROR_CONTEXT_ALREADY_IN_USE",
        217 => "CUDA_ERROR_PEER_ACCESS_UNSUPPORTED",
        218 => "CUDA_ERROR_INVALID_PTX",
        219 => "CUDA_ERROR_INVALID_GRAPHICS_CONTEXT",
        220 => "CUDA_ERROR_NVLINK_UNCORRECTABLE",
        221 => "CUDA_ERROR_JIT_COMPILER_NOT_FOUND",
        222 => "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
        223 => "CUDA_ERROR_JIT_COMPILATION_DISABLED",
        224 => "CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY",
        225 => "CUDA_ERROR_UNSUPPORTED_DEVSIDE_SYNC",
        300 => "CUDA_ERROR_INVALID_SOURCE",
        301 => "CUDA_ERROR_FILE_NOT_FOUND",
        302 => "CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND",
        303 => "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED",
        304 => "CUDA_ERROR_OPERATING_SYSTEM",
        400 => "CUDA_ERROR_INVALID_HANDLE",
        401 => "CUDA_ERROR_ILLEGAL_STATE",
        402 => "CUDA_ERROR_LOSSY_QUERY",
        500 => "CUDA_ERROR_NOT_FOUND",
        600 => "CUDA_ERROR_NOT_READY",
        700 => "CUDA_ERROR_ILLEGAL_ADDRESS",
        701 => "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
        702 => "CUDA_ERROR_LAUNCH_TIMEOUT",
        703 => "CUDA_ERROR_LAUNCH_INCOMPATIBLE_TEXTURING",
        704 => "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED",
        705 => "CUDA_ERROR_PEER_ACCESS_NOT_ENABLED",
        708 => "CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE",
        709 => "CUDA_ERROR_CONTEXT_IS_DESTROYED",
        710 => "CUDA_ERROR_ASSERT",
        711 => "CUDA_ERROR_TOO_MANY_PEERS",
        712 => "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
        713 => "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED",
        714 => "CUDA_ERROR_HARDWARE_STACK_ERROR",
        715 => "CUDA_ERROR_ILLEGAL_INSTRUCTION",
        716 => "CUDA_ERROR_MISALIGNED_ADDRESS",
        717 => "CUDA_ERROR_INVALID_ADDRESS_SPACE",
        718 => "CUDA_ERROR_INVALID_PC",
        719 => "CUDA_ERROR_LAUNCH_FAILED",
        720 => "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE",
        800 => "CUDA_ERROR_NOT_PERMITTED",
        801 => "CUDA_ERROR_NOT_SUPPORTED",
        802 => "CUDA_ERROR_SYSTEM_NOT_READY",
        803 => "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
        804 => "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
        805 => "CUDA_ERROR_MPS_CONNECTION_FAILED",
        806 => "CUDA_ERROR_MPS_RPC_FAILURE",
        807 => "CUDA_ERROR_MPS_SERVER_NOT_READY",
        808 => "CUDA_ERROR_MPS_MAX_CLIENTS_REACHED",
        809 => "CUDA_ERROR_MPS_MAX_CONNECTIONS_REACHED",
        810 => "CUDA_ERROR_MPS_CLIENT_TERMINATED",
        811 => "CUDA_ERROR_CDP_NOT_SUPPORTED",
        812 => "CUDA_ERROR_CDP_VERSION_MISMATCH",
        900 => "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
        901 => "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
        902 => "CUDA_ERROR_STREAM_CAPTURE_MERGE",
        903 => "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED",
        904 => "CUDA_ERROR_STREAM_CAPTURE_UNJOINED",
        905 => "CUDA_ERROR_STREAM_CAPTURE_ISOLATION",
        906 => "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT",
        907 => "CUDA_ERROR_CAPTURED_EVENT",
        908 => "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD",
        909 => "CUDA_ERROR_TIMEOUT",
        910 => "CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE",
        911 => "CUDA_ERROR_EXTERNAL_DEVICE",
        912 => "CUDA_ERROR_INVALID_CLUSTER_SIZE",
        913 => "CUDA_ERROR_FUNCTION_NOT_LOADED",
        914 => "CUDA_ERROR_INVALID_RESOURCE_TYPE",
        915 => "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION",
        999 => "CUDA_ERROR_UNKNOWN",
        _ => return None,
    };
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::*;

    #[test]
    fn table_names_the_codes_kvvm_relies_on() {
        assert_eq!(error_name(CUDA_SUCCESS), Some("CUDA_SUCCESS"));
        assert_eq!(
            error_name(CUDA_ERROR_OUT_OF_MEMORY),
            Some("CUDA_ERROR_OUT_OF_MEMORY")
        );
        assert_eq!(
            error_name(CUDA_ERROR_NOT_READY),
            Some("CUDA_ERROR_NOT_READY")
        );
        assert_eq!(
            error_name(CUDA_ERROR_INVALID_VALUE),
            Some("CUDA_ERROR_INVALID_VALUE")
        );
        assert_eq!(
            error_name(CUDA_ERROR_STUB_LIBRARY),
            Some("CUDA_ERROR_STUB_LIBRARY")
        );
        assert_eq!(
            error_name(CUDA_ERROR_NOT_SUPPORTED),
            Some("CUDA_ERROR_NOT_SUPPORTED")
        );
        assert_eq!(error_name(CUDA_ERROR_UNKNOWN), Some("CUDA_ERROR_UNKNOWN"));
        assert_eq!(error_name(12345), None);
    }

    #[test]
    fn table_is_consistent_with_the_constants() {
        for (code, name) in [
            (CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE"),
            (CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED"),
            (CUDA_ERROR_DEINITIALIZED, "CUDA_ERROR_DEINITIALIZED"),
            (CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE"),
            (CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE"),
            (CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT"),
            (CUDA_ERROR_INVALID_PTX, "CUDA_ERROR_INVALID_PTX"),
            (CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE"),
            (CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND"),
            (CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS"),
            (CUDA_ERROR_NOT_PERMITTED, "CUDA_ERROR_NOT_PERMITTED"),
        ] {
            assert_eq!(error_name(code), Some(name), "code {code}");
        }
    }

    #[test]
    fn display_includes_function_name_and_description() {
        let e = DriverError::Call {
            code: CUDA_ERROR_OUT_OF_MEMORY,
            name: "CUDA_ERROR_OUT_OF_MEMORY".into(),
            description: "out of memory".into(),
            function: "cuMemCreate",
        };
        let s = e.to_string();
        assert!(s.contains("cuMemCreate"), "{s}");
        assert!(s.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{s}");
        assert!(s.contains("out of memory"), "{s}");
        assert!(e.is_out_of_memory());
        assert_eq!(e.code(), Some(2));
        assert_eq!(e.clone(), e);

        let e = DriverError::LibraryNotFound {
            library: "CUDA driver",
            tried: vec!["libcuda.so.1".into(), "libcuda.so".into()],
            message: "libcuda.so.1: cannot open shared object file".into(),
        };
        let s = e.to_string();
        assert!(s.contains("libcuda.so.1, libcuda.so"), "{s}");
        assert!(s.contains("cannot open shared object file"), "{s}");
        assert_eq!(e.code(), None);
    }
}
