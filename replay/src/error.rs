//! The replay's error type: trace and output errors of its own, and the cache's errors.

/// Result alias of the replay.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a replay.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The KV cache or the swap engine failed.
    #[error(transparent)]
    Kvvm(#[from] kvvm::Error),
    /// A trace could not be read or parsed, or an output could not be written; the message
    /// starts with `FILE:LINE:` where a line is to blame.
    #[error("{0}")]
    Input(String),
    /// A replay configuration that cannot work.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A scheduler or allocator call made in the wrong state (a bug in the replay).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}
