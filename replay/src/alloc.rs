//! The allocator interface the scheduler drives, and two bookkeeping baselines: vLLM v0's paged
//! allocator with synchronous per-block swapping (`vllm-v0-swap`) and static reservation of
//! `max_tokens` per request (`static`). vLLM v1 is in [`crate::vllm`].

use std::collections::HashMap;

use crate::error::{Error, Result};

use crate::sched::Job;
use crate::timing::{Dir, Submit, Transfer, VmmCounters};

/// What happened to a preempted request's KV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preempted {
    /// Copied to host memory; resuming copies it back.
    Swapped,
    /// Dropped (no room on the host); resuming recomputes it (a new prefill).
    Dropped,
}

/// Memory in use at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of live tokens (KV of every token of every running request).
    pub live_bytes: u64,
    /// Bytes the allocator holds for running requests: pages mapped behind allocated slots
    /// (kvvm, including pages mapped ahead), blocks allocated to requests (paged), reservations
    /// (static).
    pub held_bytes: u64,
}

/// Counters of one allocator over a replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes copied between device and host by preemption (both directions).
    pub swapped_bytes: u64,
    /// Bytes a swap-out did not copy because the host already held them (KV reuse).
    pub reuse_saved_bytes: u64,
    /// Backend (driver or system) calls: page creation, mapping, unmapping, copies.
    pub backend_calls: u64,
    /// Copy calls made by preemption (part of `backend_calls`).
    pub copy_calls: u64,
    /// Tokens whose KV read back differently from what was written.
    pub integrity_errors: u64,
}

/// What an allocator call did, for the step-time model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Tokens of the request whose KV is in place without a prefill: a prefix-cache hit, or
    /// KV copied back from host memory. The scheduler prefills the rest.
    pub cached_tokens: usize,
    /// Copies the call made.
    pub transfers: Vec<Transfer>,
}

impl Outcome {
    /// An outcome with nothing cached and no copy.
    pub fn none() -> Outcome {
        Outcome::default()
    }
}

/// A KV allocator as the replay scheduler sees it. Requests are named by their trace id.
///
/// Methods that return `Ok(None)` or `Ok(false)` found no room and changed nothing; errors are
/// real failures that end the replay.
pub trait KvAllocator {
    /// The name in reports (`kvvm-interleaved`, `vllm-v1`, ...).
    fn name(&self) -> String;
    /// Whether this is a bookkeeping model (no memory behind it) rather than the real cache.
    fn is_model(&self) -> bool {
        true
    }
    /// How preemption works for this allocator, in words (for the report).
    fn preemption(&self) -> &'static str;
    /// Bytes of KV one token takes.
    fn token_bytes(&self) -> u64;
    /// Whether running requests take more memory as they grow (admission then keeps the
    /// scheduler's watermark free for them).
    fn grows(&self) -> bool {
        true
    }
    /// Bytes the allocator would hold for a request of `tokens` tokens.
    fn bytes_for(&self, tokens: usize) -> u64;
    /// Bytes that running requests could still grow into (the budget minus what they hold).
    fn free_bytes(&self) -> u64;
    /// Admits `job` and writes the KV of its first `tokens` tokens (prefill); `None` when there
    /// is no room.
    ///
    /// # Errors
    /// Failures other than lack of room.
    fn admit(&mut self, job: &Job, tokens: usize) -> Result<Option<Outcome>>;
    /// Grows every `(id, tokens)` of the batch to `tokens` tokens, writing the new tokens' KV;
    /// all or nothing.
    ///
    /// # Errors
    /// Failures other than lack of room.
    fn grow(&mut self, batch: &[(u64, usize)]) -> Result<bool>;
    /// Preempts running request `id`, freeing its device memory.
    ///
    /// # Errors
    /// Failures of the copy or of unmapping.
    fn preempt(&mut self, id: u64) -> Result<(Preempted, Outcome)>;
    /// Resumes preempted `job` holding `tokens` tokens: copies its KV back (swapped), finds it
    /// cached, or makes room to recompute it (dropped), then checks every token's KV that came
    /// back. `None` when there is no room.
    ///
    /// # Errors
    /// Failures other than lack of room.
    fn resume(&mut self, job: &Job, tokens: usize) -> Result<Option<Outcome>>;
    /// Request `id` is done: checks its KV and frees everything it holds.
    ///
    /// # Errors
    /// Failures freeing it.
    fn finish(&mut self, id: u64) -> Result<()>;
    /// Copies the allocator starts after a step has computed (offload of the blocks the step
    /// filled); called once per step.
    fn after_step(&mut self) -> Vec<Transfer> {
        Vec::new()
    }
    /// VMM calls so far, by where they ran (none for the models, which allocate up front).
    fn vmm_calls(&self) -> VmmCounters {
        VmmCounters::default()
    }
    /// Memory in use now.
    fn usage(&self) -> Usage;
    /// Counters so far.
    fn counters(&self) -> Counters;
}

/// The host side of the bookkeeping allocators' swapping: a byte budget for swapped-out KV.
#[derive(Debug)]
struct HostModel {
    budget: u64,
    used: u64,
    held: HashMap<u64, u64>,
}

impl HostModel {
    fn take(&mut self, id: u64, bytes: u64) -> bool {
        if self.used + bytes > self.budget {
            return false;
        }
        self.used += bytes;
        self.held.insert(id, bytes);
        true
    }
    /// Releases `id`'s host copy; returns whether it had one.
    fn release(&mut self, id: u64) -> bool {
        match self.held.remove(&id) {
            Some(b) => {
                self.used -= b;
                true
            }
            None => false,
        }
    }
}

/// vLLM v0's paged allocator with swapping (`vllm-v0-swap`; bookkeeping only, no memory behind
/// it): the budget is divided into blocks of `block_tokens` tokens, a request holds
/// `ceil(tokens / block_tokens)` blocks. Preemption swaps the request's blocks to host memory
/// the way vLLM v0's `CacheEngine.swap_out`/`swap_in` do: `swap_blocks` per layer for K and for
/// V, one `cudaMemcpyAsync` per block (`2 × layers` calls per block, each direction), on the
/// compute stream before the step's forward pass (the step waits for them), with no reuse of
/// earlier host copies. When the host budget is full the request is dropped and recomputed.
#[derive(Debug)]
pub struct PagedModel {
    block_tokens: usize,
    token_bytes: u64,
    layers: usize,
    total_blocks: u64,
    used_blocks: u64,
    running: HashMap<u64, usize>,
    host: HostModel,
    counters: Counters,
}

impl PagedModel {
    /// A paged allocator of `budget_bytes` with blocks of `block_tokens` tokens of `token_bytes`
    /// bytes each, for a model of `layers` layers, swapping into `host_budget_bytes`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero sizes.
    pub fn new(
        budget_bytes: u64,
        block_tokens: usize,
        token_bytes: u64,
        layers: usize,
        host_budget_bytes: u64,
    ) -> Result<Self> {
        if block_tokens == 0 || token_bytes == 0 || layers == 0 {
            return Err(Error::InvalidConfig(
                "paged model: block tokens, token bytes and layers must be positive".into(),
            ));
        }
        Ok(PagedModel {
            block_tokens,
            token_bytes,
            layers,
            total_blocks: budget_bytes / (block_tokens as u64 * token_bytes),
            used_blocks: 0,
            running: HashMap::new(),
            host: HostModel {
                budget: host_budget_bytes,
                used: 0,
                held: HashMap::new(),
            },
            // vLLM allocates its whole KV pool once, up front.
            counters: Counters {
                backend_calls: 1,
                ..Counters::default()
            },
        })
    }

    fn blocks(&self, tokens: usize) -> u64 {
        tokens.div_ceil(self.block_tokens) as u64
    }

    fn block_bytes(&self) -> u64 {
        self.block_tokens as u64 * self.token_bytes
    }

    fn copy(&mut self, blocks: u64, dir: Dir) -> Transfer {
        let t = Transfer {
            dir,
            bytes: blocks * self.block_bytes(),
            descriptors: blocks * 2 * self.layers as u64,
            submit: Submit::PerCall,
            sync: true,
            submit_on_step: true,
        };
        self.counters.swapped_bytes += t.bytes;
        self.counters.copy_calls += t.descriptors;
        self.counters.backend_calls += t.descriptors;
        t
    }
}

fn unknown(id: u64) -> Error {
    Error::InvalidArgument(format!("request {id} is not running"))
}

impl KvAllocator for PagedModel {
    fn name(&self) -> String {
        if self.block_tokens == 16 {
            "vllm-v0-swap".into()
        } else {
            format!("vllm-v0-swap-{}", self.block_tokens)
        }
    }
    fn preemption(&self) -> &'static str {
        "synchronous swap, one copy per block per layer for K and V (recompute when the host is full)"
    }
    fn token_bytes(&self) -> u64 {
        self.token_bytes
    }
    fn bytes_for(&self, tokens: usize) -> u64 {
        self.blocks(tokens) * self.block_bytes()
    }
    fn free_bytes(&self) -> u64 {
        (self.total_blocks - self.used_blocks) * self.block_bytes()
    }
    fn admit(&mut self, job: &Job, tokens: usize) -> Result<Option<Outcome>> {
        let b = self.blocks(tokens);
        if self.used_blocks + b > self.total_blocks {
            return Ok(None);
        }
        self.used_blocks += b;
        self.running.insert(job.id, tokens);
        Ok(Some(Outcome::none()))
    }
    fn grow(&mut self, batch: &[(u64, usize)]) -> Result<bool> {
        let mut extra = 0;
        for &(id, t) in batch {
            let cur = *self.running.get(&id).ok_or_else(|| unknown(id))?;
            extra += self.blocks(t.max(cur)) - self.blocks(cur);
        }
        if self.used_blocks + extra > self.total_blocks {
            return Ok(false);
        }
        self.used_blocks += extra;
        for &(id, t) in batch {
            if let Some(cur) = self.running.get_mut(&id) {
                *cur = t.max(*cur);
            }
        }
        Ok(true)
    }
    fn preempt(&mut self, id: u64) -> Result<(Preempted, Outcome)> {
        let tokens = self.running.remove(&id).ok_or_else(|| unknown(id))?;
        let b = self.blocks(tokens);
        self.used_blocks -= b;
        if self.host.take(id, b * self.block_bytes()) {
            let t = self.copy(b, Dir::ToHost);
            Ok((
                Preempted::Swapped,
                Outcome {
                    cached_tokens: 0,
                    transfers: vec![t],
                },
            ))
        } else {
            Ok((Preempted::Dropped, Outcome::none()))
        }
    }
    fn resume(&mut self, job: &Job, tokens: usize) -> Result<Option<Outcome>> {
        let b = self.blocks(tokens);
        if self.used_blocks + b > self.total_blocks {
            return Ok(None);
        }
        self.used_blocks += b;
        self.running.insert(job.id, tokens);
        Ok(Some(if self.host.release(job.id) {
            Outcome {
                cached_tokens: tokens,
                transfers: vec![self.copy(b, Dir::ToDevice)],
            }
        } else {
            Outcome::none()
        }))
    }
    fn finish(&mut self, id: u64) -> Result<()> {
        let tokens = self.running.remove(&id).ok_or_else(|| unknown(id))?;
        self.used_blocks -= self.blocks(tokens);
        Ok(())
    }
    fn usage(&self) -> Usage {
        Usage {
            live_bytes: self.running.values().map(|&t| t as u64).sum::<u64>() * self.token_bytes,
            held_bytes: self.used_blocks * self.block_bytes(),
        }
    }
    fn counters(&self) -> Counters {
        self.counters
    }
}

/// Static reservation (the pre-vLLM way; bookkeeping only): every admitted request reserves
/// `max_tokens` tokens for its whole life, so a running request never runs out of room and is
/// never preempted for memory; admission waits until a whole reservation is free. A fairness
/// preemption drops the request (there is no swap space in this model) and it is recomputed.
#[derive(Debug)]
pub struct StaticModel {
    max_tokens: usize,
    token_bytes: u64,
    budget_bytes: u64,
    running: HashMap<u64, usize>,
}

impl StaticModel {
    /// Reservations of `max_tokens` tokens of `token_bytes` bytes out of `budget_bytes`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if not even one reservation fits the budget.
    pub fn new(budget_bytes: u64, max_tokens: usize, token_bytes: u64) -> Result<Self> {
        if max_tokens as u64 * token_bytes > budget_bytes || token_bytes == 0 {
            return Err(Error::InvalidConfig(format!(
                "static reservation: one request of {max_tokens} tokens does not fit {budget_bytes} bytes"
            )));
        }
        Ok(StaticModel {
            max_tokens,
            token_bytes,
            budget_bytes,
            running: HashMap::new(),
        })
    }
    fn reservation(&self) -> u64 {
        self.max_tokens as u64 * self.token_bytes
    }
}

impl KvAllocator for StaticModel {
    fn name(&self) -> String {
        "static".into()
    }
    fn preemption(&self) -> &'static str {
        "none for memory (each request reserves max_tokens); fairness preemption recomputes"
    }
    fn token_bytes(&self) -> u64 {
        self.token_bytes
    }
    fn grows(&self) -> bool {
        false
    }
    fn bytes_for(&self, _tokens: usize) -> u64 {
        self.reservation()
    }
    fn free_bytes(&self) -> u64 {
        self.budget_bytes - self.running.len() as u64 * self.reservation()
    }
    fn admit(&mut self, job: &Job, tokens: usize) -> Result<Option<Outcome>> {
        if tokens > self.max_tokens {
            return Err(Error::InvalidArgument(format!(
                "request {}: {tokens} tokens exceed max_tokens {}",
                job.id, self.max_tokens
            )));
        }
        if self.free_bytes() < self.reservation() {
            return Ok(None);
        }
        self.running.insert(job.id, tokens);
        Ok(Some(Outcome::none()))
    }
    fn grow(&mut self, batch: &[(u64, usize)]) -> Result<bool> {
        for &(id, t) in batch {
            if !self.running.contains_key(&id) {
                return Err(unknown(id));
            }
            if t > self.max_tokens {
                return Err(Error::InvalidArgument(format!(
                    "request {id}: {t} tokens exceed max_tokens {}",
                    self.max_tokens
                )));
            }
        }
        for &(id, t) in batch {
            if let Some(cur) = self.running.get_mut(&id) {
                *cur = t.max(*cur);
            }
        }
        Ok(true)
    }
    fn preempt(&mut self, id: u64) -> Result<(Preempted, Outcome)> {
        // Only fairness preempts here (growth never fails): drop, recompute on resume.
        self.running.remove(&id).ok_or_else(|| unknown(id))?;
        Ok((Preempted::Dropped, Outcome::none()))
    }
    fn resume(&mut self, job: &Job, tokens: usize) -> Result<Option<Outcome>> {
        self.admit(job, tokens)
    }
    fn finish(&mut self, id: u64) -> Result<()> {
        self.running.remove(&id).ok_or_else(|| unknown(id))?;
        Ok(())
    }
    fn usage(&self) -> Usage {
        Usage {
            live_bytes: self.running.values().map(|&t| t as u64).sum::<u64>() * self.token_bytes,
            held_bytes: self.running.len() as u64 * self.reservation(),
        }
    }
    fn counters(&self) -> Counters {
        Counters {
            backend_calls: 1,
            ..Counters::default()
        }
    }
}
