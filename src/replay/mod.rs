//! Trace replay: trace readers, the continuous-batching scheduler and the baseline allocators (being written).
