//! SwapEngine: asynchronous, coarse-grained KV swapping between device and pinned host memory (being written).
