//! The overlap model: what a copy costs, on which timeline it runs, and what waits for it.
//!
//! - Each copy direction has one copy engine ([`CopyEngines`]): transfers in one direction run
//!   one after the other, the two directions concurrently, and both concurrently with compute.
//! - A transfer's engine time is `descriptors · copy_descriptor_s + bytes / bandwidth`, and
//!   never less than the CPU time it takes to submit it (the engine cannot run ahead of its
//!   submission).
//! - A synchronous transfer (vLLM v0's swap) is waited for before the step computes; an
//!   asynchronous one is waited for only by what needs its data (a resumed request joins the
//!   batch once its swap-in has ended) or its memory (see `sched`).
//! - Submission CPU time lands on the step when the engine's own thread submits on the critical
//!   path (vLLM's offload handler), and on a background thread otherwise (kvvm's swap engine).

use crate::profile::StepModel;

/// Direction of a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Device to host (swap-out, offload store).
    ToHost,
    /// Host to device (swap-in, offload load).
    ToDevice,
}

/// How a transfer's copies are submitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submit {
    /// One `cudaMemcpyAsync` per descriptor (`copy_call_s` each).
    PerCall,
    /// All descriptors in one `cuMemcpyBatchAsync` (`batch_descriptor_s` each).
    Batched,
}

/// One transfer between device and host memory, as an allocator reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// Direction.
    pub dir: Dir,
    /// Bytes moved.
    pub bytes: u64,
    /// Contiguous pieces (copy descriptors / calls).
    pub descriptors: u64,
    /// How they are submitted.
    pub submit: Submit,
    /// Whether the step waits for the whole transfer before computing (synchronous swap).
    pub sync: bool,
    /// Whether the submission's CPU time is spent on the step's critical path.
    pub submit_on_step: bool,
}

impl Transfer {
    /// CPU seconds to submit it.
    pub fn submit_s(&self, m: &StepModel) -> f64 {
        let per = match self.submit {
            Submit::PerCall => m.gpu.copy_call_s,
            Submit::Batched => m.gpu.batch_descriptor_s,
        };
        self.descriptors as f64 * per
    }

    /// Copy-engine seconds (at least the submission time).
    pub fn engine_s(&self, m: &StepModel) -> f64 {
        let bw = match self.dir {
            Dir::ToHost => m.gpu.d2h_bytes_per_s,
            Dir::ToDevice => m.gpu.h2d_bytes_per_s,
        };
        (self.descriptors as f64 * m.gpu.copy_descriptor_s + self.bytes as f64 / bw)
            .max(self.submit_s(m))
    }
}

/// The two copy engines' timelines: when each becomes free.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CopyEngines {
    /// Device-to-host engine free at.
    pub to_host_free: f64,
    /// Host-to-device engine free at.
    pub to_device_free: f64,
    /// Engine seconds used, per direction (to host, to device).
    pub busy_s: (f64, f64),
}

impl CopyEngines {
    /// Runs `t`, issued at `now`, on its direction's engine; returns when it ends.
    pub fn issue(&mut self, t: &Transfer, now: f64, m: &StepModel) -> f64 {
        let d = t.engine_s(m);
        let free = match t.dir {
            Dir::ToHost => &mut self.to_host_free,
            Dir::ToDevice => &mut self.to_device_free,
        };
        let start = free.max(now);
        *free = start + d;
        match t.dir {
            Dir::ToHost => self.busy_s.0 += d,
            Dir::ToDevice => self.busy_s.1 += d,
        }
        start + d
    }
}

/// VMM calls counted by kind, split by where they ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmmCalls {
    /// Page creations.
    pub create: u64,
    /// Map calls (each charged one `cuMemMap` plus one `cuMemSetAccess`).
    pub map: u64,
    /// Unmap calls.
    pub unmap: u64,
}

impl VmmCalls {
    /// Seconds these calls cost.
    pub fn seconds(&self, m: &StepModel) -> f64 {
        self.create as f64 * m.gpu.create_s
            + self.map as f64 * (m.gpu.map_s + m.gpu.set_access_s)
            + self.unmap as f64 * m.gpu.unmap_s
    }

    /// `self - earlier`, saturating.
    pub fn since(&self, earlier: &VmmCalls) -> VmmCalls {
        VmmCalls {
            create: self.create.saturating_sub(earlier.create),
            map: self.map.saturating_sub(earlier.map),
            unmap: self.unmap.saturating_sub(earlier.unmap),
        }
    }
}

/// Cumulative VMM calls of an allocator: on the caller's thread (charged to the step) and on
/// background threads (charged to the background timeline).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmmCounters {
    /// On the caller's thread.
    pub foreground: VmmCalls,
    /// On kvvm's background threads (mapper, pool, swap completion).
    pub background: VmmCalls,
}
