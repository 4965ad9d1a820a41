//! Cache configuration: model shapes, dtype, layout, sizes, and the geometry derived from them.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::vmm::BackendConfig;

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum DType {
    /// IEEE half precision.
    #[default]
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE single precision.
    F32,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits.
    Fp8E4M3,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits.
    Fp8E5M2,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F16 | DType::Bf16 => 2,
            DType::F32 => 4,
            DType::Fp8E4M3 | DType::Fp8E5M2 => 1,
        }
    }
    /// The name used on the command line and in JSON.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
            DType::Fp8E4M3 => "fp8-e4m3",
            DType::Fp8E5M2 => "fp8-e5m2",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "f16" | "fp16" | "float16" | "half" => DType::F16,
            "bf16" | "bfloat16" => DType::Bf16,
            "f32" | "fp32" | "float32" => DType::F32,
            "fp8-e4m3" | "e4m3" | "fp8" => DType::Fp8E4M3,
            "fp8-e5m2" | "e5m2" => DType::Fp8E5M2,
            other => {
                return Err(Error::InvalidConfig(format!(
                    "unknown dtype {other:?} (expected f16, bf16, f32, fp8-e4m3, fp8-e5m2)"
                )))
            }
        })
    }
}

/// How the KV of all layers is laid out in virtual memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum Layout {
    /// `2 × layers` buffers, each `[max_slots, max_tokens, kv_heads, head_dim]` (vAttention's
    /// default). A page holds many tokens of one layer.
    PerLayer,
    /// One buffer `[max_slots, max_tokens, layers, 2, kv_heads, head_dim]` (vAttention's
    /// "megacache"). A page holds few tokens of every layer: one map call per page instead of
    /// `2 × layers`, and fine-grained growth, at the price of a large token stride.
    #[default]
    Interleaved,
}

impl Layout {
    /// The name used on the command line and in JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Layout::PerLayer => "per-layer",
            Layout::Interleaved => "interleaved",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Layout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "per-layer" | "perlayer" | "layer" => Ok(Layout::PerLayer),
            "interleaved" | "megacache" | "contiguous" => Ok(Layout::Interleaved),
            other => Err(Error::InvalidConfig(format!(
                "unknown layout {other:?} (expected per-layer or interleaved)"
            ))),
        }
    }
}

/// Attention shapes of a model, per tensor-parallel rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ModelShape {
    /// Preset name.
    pub name: &'static str,
    /// Transformer layers.
    pub layers: usize,
    /// Query heads (per rank).
    pub q_heads: usize,
    /// Key/value heads (per rank).
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// The built-in model presets (full model, tensor-parallel degree 1).
pub const PRESETS: &[ModelShape] = &[
    ModelShape {
        name: "llama-3-8b",
        layers: 32,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
    },
    ModelShape {
        name: "llama-3-70b",
        layers: 80,
        q_heads: 64,
        kv_heads: 8,
        head_dim: 128,
    },
    ModelShape {
        name: "llama-2-7b",
        layers: 32,
        q_heads: 32,
        kv_heads: 32,
        head_dim: 128,
    },
    ModelShape {
        name: "mistral-7b",
        layers: 32,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
    },
    ModelShape {
        name: "qwen2.5-7b",
        layers: 28,
        q_heads: 28,
        kv_heads: 4,
        head_dim: 128,
    },
    ModelShape {
        name: "qwen2.5-32b",
        layers: 64,
        q_heads: 40,
        kv_heads: 8,
        head_dim: 128,
    },
    ModelShape {
        name: "yi-34b",
        layers: 60,
        q_heads: 56,
        kv_heads: 8,
        head_dim: 128,
    },
];

impl ModelShape {
    /// Looks up a preset by name (case-insensitive). A suffix `@tpN` (for example
    /// `llama-3-70b@tp4`) divides the heads by the tensor-parallel degree `N`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an unknown name or a degree that does not divide the heads.
    pub fn preset(name: &str) -> Result<ModelShape> {
        let lower = name.to_ascii_lowercase();
        let (base, tp) = match lower.split_once("@tp") {
            Some((b, t)) => (
                b.to_string(),
                t.parse::<usize>().map_err(|_| {
                    Error::InvalidConfig(format!("bad tensor-parallel degree in {name:?}"))
                })?,
            ),
            None => (lower.clone(), 1),
        };
        let shape = PRESETS.iter().find(|p| p.name == base).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "unknown model preset {name:?} (known: {})",
                PRESETS
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        shape.with_tensor_parallel(tp)
    }

    /// The shapes one rank sees with tensor-parallel degree `tp` (heads split across ranks).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `tp` is zero or does not divide the query and KV heads.
    pub fn with_tensor_parallel(&self, tp: usize) -> Result<ModelShape> {
        if tp == 0 || self.kv_heads % tp != 0 || self.q_heads % tp != 0 {
            return Err(Error::InvalidConfig(format!(
                "tensor-parallel degree {tp} does not divide {}'s {} query and {} KV heads",
                self.name, self.q_heads, self.kv_heads
            )));
        }
        Ok(ModelShape {
            q_heads: self.q_heads / tp,
            kv_heads: self.kv_heads / tp,
            ..*self
        })
    }

    /// KV bytes of one token over all layers.
    pub fn token_bytes(&self, dtype: DType) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * dtype.size()
    }
}

/// Most virtual address space one cache may reserve (32 TiB).
pub const MAX_VIRTUAL_BYTES: u64 = 1 << 45;

/// Configuration of a [`crate::KvCache`].
///
/// Made with [`CacheConfig::for_model`] (a preset) or [`CacheConfig::new`] (any shape), then
/// adjusted with the `with_*` setters or by assigning fields. The struct is `#[non_exhaustive]`:
/// new options get a default and a setter, so adding one breaks no caller.
///
/// ```
/// use kvvm::{CacheConfig, DType, Layout};
/// let c = CacheConfig::new(32, 8, 128)
///     .with_dtype(DType::Bf16)
///     .with_max_slots(64)
///     .with_max_tokens(8192)
///     .with_layout(Layout::PerLayer)
///     .with_budget_bytes(16 << 30);
/// assert_eq!(c.max_slots, 64);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct CacheConfig {
    /// Transformer layers.
    pub layers: usize,
    /// KV heads (per rank).
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Element type.
    pub dtype: DType,
    /// Most requests held at once (the largest batch).
    pub max_slots: usize,
    /// Most tokens per request.
    pub max_tokens: usize,
    /// Memory layout.
    pub layout: Layout,
    /// Physical page size; `None` means the backend's granularity.
    pub page_size: Option<usize>,
    /// Budget for physical pages in bytes.
    pub budget_bytes: u64,
    /// Which backend to open (ignored by [`crate::cache::KvCache::with_backend`]).
    pub backend: BackendConfig,
    /// Decode steps the background mapper maps ahead; 0 disables the background mapper (all
    /// mapping then happens inline in `ensure`/`step`).
    pub lookahead_steps: usize,
    /// Create every page of the budget when the cache is made.
    pub create_all_pages: bool,
    /// The caller's compute stream (a raw `CUstream`; 0 is the legacy default stream), after
    /// whose queued work kvvm orders its copies and unmaps (see `docs/ordering.md`). `None`: the
    /// legacy default stream's order on CUDA. Ignored by the host backend.
    pub compute_stream: Option<u64>,
    /// Free pages the pool keeps for reuse; pages freed above this are released to the system
    /// by the pool's thread. `None` (the default) keeps them up to the budget: the budget is
    /// checked against the memory the process may use when the cache is made, and a swap or a
    /// burst of requests then reuses populated pages instead of creating them again (releasing
    /// and re-creating cost the host backend 4–5× its swap-in bandwidth). `Some(n)` returns
    /// memory to the system sooner, at that cost.
    pub max_free_pages: Option<usize>,
}

impl CacheConfig {
    /// A configuration for a preset model (see [`ModelShape::preset`]) with f16, the interleaved
    /// layout, the backend's page size, a lookahead of 8 steps.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an unknown preset.
    pub fn for_model(
        preset: &str,
        max_slots: usize,
        max_tokens: usize,
        budget_bytes: u64,
    ) -> Result<Self> {
        let m = ModelShape::preset(preset)?;
        Ok(CacheConfig::new(m.layers, m.kv_heads, m.head_dim)
            .with_max_slots(max_slots)
            .with_max_tokens(max_tokens)
            .with_budget_bytes(budget_bytes))
    }

    /// A configuration for `layers` layers of `kv_heads` KV heads of `head_dim` elements, with
    /// the defaults: f16, 1 slot of 4096 tokens, the interleaved layout, the backend's page size,
    /// a budget of 1 GiB, the automatically chosen backend, a look-ahead of 8 steps, pages
    /// created on demand. The shape is checked when the cache is made.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        CacheConfig {
            layers,
            kv_heads,
            head_dim,
            dtype: DType::F16,
            max_slots: 1,
            max_tokens: 4096,
            layout: Layout::Interleaved,
            page_size: None,
            budget_bytes: 1 << 30,
            backend: BackendConfig::default(),
            lookahead_steps: 8,
            create_all_pages: false,
            compute_stream: None,
            max_free_pages: None,
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $field:ident: $ty:ty;)*) => {
        impl CacheConfig {
            $(
                $(#[$doc])*
                #[must_use]
                pub fn $name(mut self, $field: $ty) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}

setters! {
    /// Sets [`CacheConfig::layers`].
    with_layers: layers: usize;
    /// Sets [`CacheConfig::kv_heads`].
    with_kv_heads: kv_heads: usize;
    /// Sets [`CacheConfig::head_dim`].
    with_head_dim: head_dim: usize;
    /// Sets [`CacheConfig::dtype`].
    with_dtype: dtype: DType;
    /// Sets [`CacheConfig::max_slots`].
    with_max_slots: max_slots: usize;
    /// Sets [`CacheConfig::max_tokens`].
    with_max_tokens: max_tokens: usize;
    /// Sets [`CacheConfig::layout`].
    with_layout: layout: Layout;
    /// Sets [`CacheConfig::page_size`] (`None`: the backend's granularity).
    with_page_size: page_size: Option<usize>;
    /// Sets [`CacheConfig::budget_bytes`].
    with_budget_bytes: budget_bytes: u64;
    /// Sets [`CacheConfig::backend`].
    with_backend: backend: BackendConfig;
    /// Sets [`CacheConfig::lookahead_steps`] (0: no background mapper).
    with_lookahead_steps: lookahead_steps: usize;
    /// Sets [`CacheConfig::compute_stream`].
    with_compute_stream: compute_stream: Option<u64>;
    /// Sets [`CacheConfig::create_all_pages`].
    with_create_all_pages: create_all_pages: bool;
    /// Sets [`CacheConfig::max_free_pages`].
    with_max_free_pages: max_free_pages: Option<usize>;
}

/// The most slots a cache may have (a bound on up-front bookkeeping, far above any batch).
pub const MAX_SLOTS: usize = 1 << 20;

/// The most layers a cache may have (far above any model; each layer is two buffers, that is two
/// reservations, in the per-layer layout).
pub const MAX_LAYERS: usize = 1 << 16;

/// The most (slot, buffer) page lists a cache may keep (`max_slots × buffers`): a bound on the
/// bookkeeping allocated up front.
pub const MAX_PAGE_LISTS: usize = 1 << 22;

/// Sizes derived from a [`CacheConfig`] and the page size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Geometry {
    /// Layout.
    pub layout: Layout,
    /// Transformer layers.
    pub layers: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Element type.
    pub dtype: DType,
    /// Slots.
    pub max_slots: usize,
    /// Tokens per slot.
    pub max_tokens: usize,
    /// Page size in bytes.
    pub page_size: usize,
    /// Number of buffers (`2 × layers` per-layer, 1 interleaved).
    pub buffers: usize,
    /// Bytes one token occupies in one buffer.
    pub token_bytes: usize,
    /// Bytes between consecutive slots in a buffer (a multiple of the page size).
    pub slot_bytes: usize,
    /// Pages needed to hold `max_tokens` tokens in one buffer.
    pub pages_per_slot: usize,
}

impl Geometry {
    /// Derives the geometry, checking every constraint.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero sizes, a page size that is not a multiple of
    /// `granularity`, a reservation that overflows or passes [`MAX_VIRTUAL_BYTES`], or a budget
    /// below one page per buffer.
    pub fn new(c: &CacheConfig, granularity: usize) -> Result<Self> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        for (name, v) in [
            ("layers", c.layers),
            ("kv_heads", c.kv_heads),
            ("head_dim", c.head_dim),
            ("max_slots", c.max_slots),
            ("max_tokens", c.max_tokens),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        // Each slot costs a little bookkeeping memory up front: bound it so that a wild value
        // is an error rather than an allocation failure (which aborts the process).
        if c.max_slots > MAX_SLOTS {
            return bad(format!("max_slots {} exceeds {MAX_SLOTS}", c.max_slots));
        }
        if c.layers > MAX_LAYERS {
            return bad(format!("layers {} exceeds {MAX_LAYERS}", c.layers));
        }
        let page_size = c.page_size.unwrap_or(granularity);
        if granularity == 0 || page_size == 0 || page_size % granularity != 0 {
            return bad(format!(
                "page size {page_size} is not a positive multiple of the backend granularity {granularity}"
            ));
        }
        let overflow = || Error::InvalidConfig("cache dimensions overflow".into());
        let row = c
            .kv_heads
            .checked_mul(c.head_dim)
            .and_then(|v| v.checked_mul(c.dtype.size()))
            .ok_or_else(overflow)?;
        let (buffers, token_bytes) = match c.layout {
            Layout::PerLayer => (c.layers.checked_mul(2).ok_or_else(overflow)?, row),
            Layout::Interleaved => (
                1,
                row.checked_mul(2)
                    .and_then(|v| v.checked_mul(c.layers))
                    .ok_or_else(overflow)?,
            ),
        };
        if c.max_slots.saturating_mul(buffers) > MAX_PAGE_LISTS {
            return bad(format!(
                "{} slots × {buffers} buffers exceed {MAX_PAGE_LISTS} page lists",
                c.max_slots
            ));
        }
        let raw_slot = token_bytes.checked_mul(c.max_tokens).ok_or_else(overflow)?;
        let pages_per_slot = raw_slot.div_ceil(page_size);
        let slot_bytes = pages_per_slot.checked_mul(page_size).ok_or_else(overflow)?;
        let total = (slot_bytes as u64)
            .checked_mul(c.max_slots as u64)
            .and_then(|v| v.checked_mul(buffers as u64))
            .ok_or_else(overflow)?;
        if total > MAX_VIRTUAL_BYTES {
            return bad(format!(
                "the cache would reserve {total} bytes of virtual address space, more than {MAX_VIRTUAL_BYTES}"
            ));
        }
        let min_budget = (page_size as u64) * buffers as u64;
        if c.budget_bytes < min_budget {
            return bad(format!(
                "budget of {} bytes is below one page per buffer ({buffers} × {page_size} = {min_budget})",
                c.budget_bytes
            ));
        }
        Ok(Geometry {
            layout: c.layout,
            layers: c.layers,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            dtype: c.dtype,
            max_slots: c.max_slots,
            max_tokens: c.max_tokens,
            page_size,
            buffers,
            token_bytes,
            slot_bytes,
            pages_per_slot,
        })
    }

    /// Bytes of one buffer (all slots).
    pub fn buffer_bytes(&self) -> usize {
        self.slot_bytes * self.max_slots
    }

    /// Pages (per buffer) needed to hold `tokens` tokens.
    pub fn pages_for(&self, tokens: usize) -> usize {
        (tokens * self.token_bytes).div_ceil(self.page_size)
    }

    /// Whether `pages` pages per buffer hold `tokens` tokens (`pages_for(tokens) <= pages`,
    /// without a division: this is on every decode step's path).
    #[inline]
    pub fn fits(&self, tokens: usize, pages: usize) -> bool {
        tokens * self.token_bytes <= pages * self.page_size
    }

    /// Tokens that `pages` pages (per buffer) hold, capped at `max_tokens`.
    pub fn tokens_in(&self, pages: usize) -> usize {
        (pages * self.page_size / self.token_bytes).min(self.max_tokens)
    }

    /// KV bytes of one token over all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.token_bytes * self.buffers
    }

    /// Bytes of one `[kv_heads, head_dim]` row (one token, one layer, K or V).
    pub fn row_bytes(&self) -> usize {
        self.kv_heads * self.head_dim * self.dtype.size()
    }

    /// (buffer index, byte offset within the slot's token row) of layer `layer`'s K (`v = false`)
    /// or V (`v = true`).
    pub fn locate(&self, layer: usize, v: bool) -> (usize, usize) {
        match self.layout {
            Layout::PerLayer => (2 * layer + usize::from(v), 0),
            Layout::Interleaved => (0, (2 * layer + usize::from(v)) * self.row_bytes()),
        }
    }
}
