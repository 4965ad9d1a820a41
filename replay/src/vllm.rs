//! vLLM V1's KV cache manager as a bookkeeping model (`vllm-v1`), and the same with its CPU
//! offloading connector (`vllm-v1-offload`).
//!
//! What it reproduces (vLLM `v1/core/block_pool.py`, `kv_cache_manager.py`, `sched/scheduler.py`,
//! `distributed/kv_transfer/kv_connector/v1/offloading_connector.py`; `docs/replay.md` has the
//! details and sources):
//!
//! - one pool of 16-token blocks sized from the byte budget, allocated up front;
//! - **automatic prefix caching**: every full block gets a hash chained on its parent's
//!   (`hash(parent, block content)`); a request's leading full blocks whose hashes are cached
//!   are reused (never the block holding the last token: at least one token is computed);
//! - freed blocks go to the tail of a free queue, a request's blocks in reverse order (its tail
//!   is evicted first); allocation takes the head, evicting the block's hash: an LRU of free
//!   cached blocks;
//! - **preemption recomputes**: the request's blocks are freed (they stay cached until
//!   evicted), and on resume it is prefilled again, minus the prefix it still finds cached;
//! - with offload, every block that becomes full is stored to CPU memory (write-through, one
//!   LRU of CPU blocks sized from the host budget) in the step after it was computed, one copy
//!   descriptor per block per layer for K and for V, all of a step submitted in one
//!   `cuMemcpyBatchAsync` on a copy stream; a request that (re)starts looks its blocks up on
//!   the GPU first, then on the CPU, loads the CPU hits asynchronously and waits for them.
//!
//! Block content is not known from a trace: a prompt block inside the leading 512-token blocks
//! a Mooncake trace names by `hash_ids` gets content `(hash id, block within it)`; every other
//! block is private to its request `(request id, block index)`. Chaining makes a shared
//! prefix the only way two requests' blocks match.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};

use crate::alloc::{Counters, KvAllocator, Outcome, Preempted, Usage};
use crate::sched::Job;
use crate::timing::{Dir, Submit, Transfer};

/// Tokens per Mooncake `hash_ids` block.
pub const HASH_BLOCK_TOKENS: usize = 512;

fn mix(a: u64, b: u64) -> u64 {
    // splitmix64 of the combination: cheap and well spread.
    let mut z = a.rotate_left(29) ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The chained hash of full block `i` of `job` (`parent`: the previous block's hash, or 0).
pub fn block_hash(job: &Job, block_tokens: usize, i: usize, parent: u64) -> u64 {
    let start = i * block_tokens;
    let end = start + block_tokens;
    let (a, b) = (start / HASH_BLOCK_TOKENS, (end - 1) / HASH_BLOCK_TOKENS);
    let content = if end <= job.context && a == b && b < job.hash_ids.len() {
        mix(
            mix(1, job.hash_ids[a]),
            ((start % HASH_BLOCK_TOKENS) / block_tokens) as u64,
        )
    } else {
        mix(mix(2, job.id), i as u64)
    };
    mix(parent, content)
}

#[derive(Clone, Copy, Debug, Default)]
struct Block {
    refs: u32,
    hash: Option<u64>,
    /// Position in the free queue while `refs == 0`.
    free_seq: Option<u64>,
}

#[derive(Clone, Debug)]
struct Req {
    job: Job,
    blocks: Vec<u32>,
    tokens: usize,
    /// Hashes of the full blocks, in order.
    hashes: Vec<u64>,
}

/// The CPU side of the offloading connector: an LRU of block hashes.
#[derive(Debug)]
struct CpuCache {
    capacity: usize,
    seq: u64,
    by_hash: HashMap<u64, u64>,
    lru: BTreeMap<u64, u64>,
}

impl CpuCache {
    fn contains(&self, h: u64) -> bool {
        self.by_hash.contains_key(&h)
    }
    fn touch(&mut self, h: u64) {
        if let Some(s) = self.by_hash.get_mut(&h) {
            self.lru.remove(s);
            self.seq += 1;
            *s = self.seq;
            self.lru.insert(self.seq, h);
        }
    }
    /// Stores `h`; returns whether a copy is needed (it was not there yet).
    fn store(&mut self, h: u64) -> bool {
        if self.contains(h) {
            self.touch(h);
            return false;
        }
        if self.capacity == 0 {
            return false;
        }
        if self.by_hash.len() >= self.capacity {
            if let Some((_, old)) = self.lru.pop_first() {
                self.by_hash.remove(&old);
            }
        }
        self.seq += 1;
        self.by_hash.insert(h, self.seq);
        self.lru.insert(self.seq, h);
        true
    }
}

/// Counters of the vLLM model beyond [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VllmCounters {
    /// Tokens found in GPU blocks of the prefix cache.
    pub gpu_hit_tokens: u64,
    /// Tokens loaded from the CPU cache.
    pub cpu_hit_tokens: u64,
    /// Blocks stored to the CPU.
    pub stored_blocks: u64,
    /// Blocks loaded from the CPU.
    pub loaded_blocks: u64,
    /// Cached blocks evicted from the GPU free queue.
    pub evicted_blocks: u64,
}

/// vLLM V1's block pool and prefix cache. See the [module documentation](self).
#[derive(Debug)]
pub struct VllmV1 {
    block_tokens: usize,
    token_bytes: u64,
    layers: usize,
    blocks: Vec<Block>,
    free: BTreeMap<u64, u32>,
    seq: u64,
    cached: HashMap<u64, u32>,
    running: HashMap<u64, Req>,
    cpu: Option<CpuCache>,
    /// Merge descriptors of blocks adjacent in the pool (vLLM's CUDA path does not).
    coalesce: bool,
    pending_stores: Vec<u32>,
    counters: Counters,
    vllm: VllmCounters,
}

impl VllmV1 {
    /// A pool of `budget_bytes` in blocks of `block_tokens` tokens of `token_bytes` bytes, for a
    /// model of `layers` layers; with `offload_bytes = Some(host budget)` the CPU offloading
    /// connector is on.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero sizes or a pool of more than 2^32 blocks.
    pub fn new(
        budget_bytes: u64,
        block_tokens: usize,
        token_bytes: u64,
        layers: usize,
        offload_bytes: Option<u64>,
    ) -> Result<Self> {
        if block_tokens == 0 || token_bytes == 0 || layers == 0 {
            return Err(Error::InvalidConfig(
                "vllm model: block tokens, token bytes and layers must be positive".into(),
            ));
        }
        let block_bytes = block_tokens as u64 * token_bytes;
        let n = budget_bytes / block_bytes;
        if n > u64::from(u32::MAX) {
            return Err(Error::InvalidConfig(format!(
                "vllm model: {n} blocks are too many"
            )));
        }
        let mut free = BTreeMap::new();
        let mut blocks = vec![Block::default(); n as usize];
        for (i, b) in blocks.iter_mut().enumerate() {
            b.free_seq = Some(i as u64);
            free.insert(i as u64, i as u32);
        }
        Ok(VllmV1 {
            block_tokens,
            token_bytes,
            layers,
            blocks,
            free,
            seq: n,
            cached: HashMap::new(),
            running: HashMap::new(),
            cpu: offload_bytes.map(|b| CpuCache {
                capacity: (b / block_bytes) as usize,
                seq: 0,
                by_hash: HashMap::new(),
                lru: BTreeMap::new(),
            }),
            coalesce: false,
            pending_stores: Vec::new(),
            counters: Counters {
                backend_calls: 1,
                ..Counters::default()
            },
            vllm: VllmCounters::default(),
        })
    }

    /// Merges copy descriptors of blocks adjacent in the pool into one (what vLLM's ROCm path
    /// does; its CUDA path submits one descriptor per block).
    pub fn set_coalesce(&mut self, on: bool) {
        self.coalesce = on;
    }

    /// The model's own counters.
    pub fn vllm_counters(&self) -> VllmCounters {
        self.vllm
    }

    /// Blocks on the free queue.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Whether a block with hash `h` is in the GPU prefix cache.
    pub fn is_cached(&self, h: u64) -> bool {
        self.cached.contains_key(&h)
    }

    fn block_bytes(&self) -> u64 {
        self.block_tokens as u64 * self.token_bytes
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    fn push_free(&mut self, b: u32) {
        let blk = &mut self.blocks[b as usize];
        self.seq += 1;
        blk.free_seq = Some(self.seq);
        self.free.insert(self.seq, b);
    }

    fn take_free(&mut self, b: u32) {
        if let Some(s) = self.blocks[b as usize].free_seq.take() {
            self.free.remove(&s);
        }
    }

    /// Pops the head of the free queue, evicting its cached hash.
    fn pop_free(&mut self) -> Option<u32> {
        let (_, b) = self.free.pop_first()?;
        let blk = &mut self.blocks[b as usize];
        blk.free_seq = None;
        if let Some(h) = blk.hash.take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
            }
            self.vllm.evicted_blocks += 1;
        }
        Some(b)
    }

    fn register(&mut self, b: u32, h: u64) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(h) {
            e.insert(b);
            self.blocks[b as usize].hash = Some(h);
        }
    }

    /// Copy descriptors for `blocks` (per layer, K and V).
    fn descriptors(&self, blocks: &[u32]) -> u64 {
        let pieces = if self.coalesce {
            let mut sorted = blocks.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            sorted.windows(2).filter(|w| w[1] != w[0] + 1).count() + usize::from(!sorted.is_empty())
        } else {
            blocks.len()
        };
        pieces as u64 * 2 * self.layers as u64
    }

    fn transfer(&mut self, blocks: &[u32], dir: Dir) -> Transfer {
        let t = Transfer {
            dir,
            bytes: blocks.len() as u64 * self.block_bytes(),
            descriptors: self.descriptors(blocks),
            submit: Submit::Batched,
            sync: false,
            submit_on_step: true,
        };
        self.counters.swapped_bytes += t.bytes;
        self.counters.copy_calls += t.descriptors;
        self.counters.backend_calls += 1;
        t
    }

    /// Allocates `tokens` tokens of `job` with prefix-cache (and CPU) hits; `None` if the free
    /// blocks do not suffice.
    fn allocate(&mut self, job: &Job, tokens: usize) -> Option<Outcome> {
        let full = tokens / self.block_tokens;
        let max_hit = tokens.saturating_sub(1) / self.block_tokens;
        let mut hashes = Vec::with_capacity(full);
        let mut parent = 0;
        for i in 0..full {
            parent = block_hash(job, self.block_tokens, i, parent);
            hashes.push(parent);
        }
        let gpu_hits: Vec<u32> = hashes[..max_hit.min(full)]
            .iter()
            .map_while(|h| self.cached.get(h).copied())
            .collect();
        let cpu_hits = match &self.cpu {
            Some(cpu) => hashes[gpu_hits.len()..max_hit.min(full)]
                .iter()
                .take_while(|h| cpu.contains(**h))
                .count(),
            None => 0,
        };
        let need = self.blocks_for(tokens) - gpu_hits.len();
        let hits_on_free = gpu_hits
            .iter()
            .filter(|&&b| self.blocks[b as usize].refs == 0)
            .count();
        if self.free.len() - hits_on_free < need {
            return None;
        }
        for &b in &gpu_hits {
            self.take_free(b);
            self.blocks[b as usize].refs += 1;
        }
        let mut blocks = gpu_hits.clone();
        for _ in 0..need {
            let b = self.pop_free()?;
            self.blocks[b as usize].refs = 1;
            blocks.push(b);
        }
        // The new full blocks are computed (or loaded) now: cache them, store the computed ones.
        let loaded: Vec<u32> = blocks[gpu_hits.len()..gpu_hits.len() + cpu_hits].to_vec();
        for (i, &h) in hashes.iter().enumerate().skip(gpu_hits.len()) {
            self.register(blocks[i], h);
        }
        if let Some(cpu) = &mut self.cpu {
            for &h in &hashes[gpu_hits.len()..gpu_hits.len() + cpu_hits] {
                cpu.touch(h);
            }
            for (i, &h) in hashes.iter().enumerate().skip(gpu_hits.len() + cpu_hits) {
                if cpu.store(h) {
                    self.pending_stores.push(blocks[i]);
                }
            }
        }
        self.vllm.gpu_hit_tokens += (gpu_hits.len() * self.block_tokens) as u64;
        self.vllm.cpu_hit_tokens += (cpu_hits * self.block_tokens) as u64;
        self.vllm.loaded_blocks += cpu_hits as u64;
        let mut transfers = Vec::new();
        if !loaded.is_empty() {
            transfers.push(self.transfer(&loaded, Dir::ToDevice));
        }
        self.running.insert(
            job.id,
            Req {
                job: job.clone(),
                blocks,
                tokens,
                hashes,
            },
        );
        Some(Outcome {
            cached_tokens: (gpu_hits.len() + cpu_hits) * self.block_tokens,
            transfers,
        })
    }

    /// Frees `id`'s blocks, tail first (vLLM evicts a request's tail blocks first).
    fn release(&mut self, id: u64) -> Result<()> {
        let req = self.running.remove(&id).ok_or_else(|| unknown(id))?;
        for &b in req.blocks.iter().rev() {
            let blk = &mut self.blocks[b as usize];
            blk.refs -= 1;
            if blk.refs == 0 {
                self.push_free(b);
            }
        }
        // A block that never became full leaves no reusable content.
        Ok(())
    }
}

fn unknown(id: u64) -> Error {
    Error::InvalidArgument(format!("request {id} is not running"))
}

impl KvAllocator for VllmV1 {
    fn name(&self) -> String {
        if self.cpu.is_some() {
            "vllm-v1-offload".into()
        } else {
            "vllm-v1".into()
        }
    }
    fn preemption(&self) -> &'static str {
        if self.cpu.is_some() {
            "recompute, minus the prefix still cached on the GPU or stored on the CPU (loaded asynchronously)"
        } else {
            "recompute, minus the prefix still in the GPU prefix cache"
        }
    }
    fn token_bytes(&self) -> u64 {
        self.token_bytes
    }
    fn bytes_for(&self, tokens: usize) -> u64 {
        self.blocks_for(tokens) as u64 * self.block_bytes()
    }
    fn free_bytes(&self) -> u64 {
        self.free.len() as u64 * self.block_bytes()
    }
    fn admit(&mut self, job: &Job, tokens: usize) -> Result<Option<Outcome>> {
        if self.running.contains_key(&job.id) {
            return Err(Error::InvalidArgument(format!(
                "request {} already runs",
                job.id
            )));
        }
        Ok(self.allocate(job, tokens))
    }
    fn grow(&mut self, batch: &[(u64, usize)]) -> Result<bool> {
        let mut need = 0;
        for &(id, t) in batch {
            let r = self.running.get(&id).ok_or_else(|| unknown(id))?;
            need += self.blocks_for(t).saturating_sub(r.blocks.len());
        }
        if need > self.free.len() {
            return Ok(false);
        }
        let bt = self.block_tokens;
        for &(id, t) in batch {
            let Some(mut r) = self.running.remove(&id) else {
                continue;
            };
            while r.blocks.len() < t.div_ceil(bt) {
                let Some(b) = self.pop_free() else {
                    return Err(Error::InvalidArgument(
                        "vllm model: free count broken".into(),
                    ));
                };
                self.blocks[b as usize].refs = 1;
                r.blocks.push(b);
            }
            r.tokens = r.tokens.max(t);
            while r.hashes.len() < r.tokens / bt {
                let i = r.hashes.len();
                let h = block_hash(&r.job, bt, i, r.hashes.last().copied().unwrap_or(0));
                r.hashes.push(h);
                let b = r.blocks[i];
                self.register(b, h);
                if let Some(cpu) = &mut self.cpu {
                    if cpu.store(h) {
                        self.pending_stores.push(b);
                    }
                }
            }
            self.running.insert(id, r);
        }
        Ok(true)
    }
    fn preempt(&mut self, id: u64) -> Result<(Preempted, Outcome)> {
        self.release(id)?;
        Ok((Preempted::Dropped, Outcome::none()))
    }
    fn resume(&mut self, job: &Job, tokens: usize) -> Result<Option<Outcome>> {
        self.admit(job, tokens)
    }
    fn finish(&mut self, id: u64) -> Result<()> {
        self.release(id)
    }
    fn after_step(&mut self) -> Vec<Transfer> {
        if self.pending_stores.is_empty() {
            return Vec::new();
        }
        let blocks = std::mem::take(&mut self.pending_stores);
        self.vllm.stored_blocks += blocks.len() as u64;
        vec![self.transfer(&blocks, Dir::ToHost)]
    }
    fn usage(&self) -> Usage {
        let held = (self.blocks.len() - self.free.len()) as u64 * self.block_bytes();
        let live = self.running.values().map(|r| r.tokens as u64).sum::<u64>() * self.token_bytes;
        Usage {
            // Requests sharing prefix blocks hold them once.
            live_bytes: live.min(held),
            held_bytes: held,
        }
    }
    fn counters(&self) -> Counters {
        self.counters
    }
}
