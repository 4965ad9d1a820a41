//! The host arena: large blocks from [`Backend::alloc_host`] (page-locked on CUDA, anonymous
//! memory on the host backend) carved into extents by a first-fit allocator with coalescing.
//!
//! The arena only does bookkeeping; the engine decides when to grow it (within its budget) and
//! when to evict host copies to make room.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::vmm::{Backend, HostBuffer};

/// Extents are aligned to (and sized in multiples of) this many bytes.
pub(crate) const ALIGN: usize = 4096;
/// The smallest block the arena asks the backend for (the budget permitting).
pub(crate) const MIN_BLOCK: usize = 64 << 20;

/// A piece of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Extent {
    pub(crate) block: usize,
    pub(crate) offset: usize,
    pub(crate) len: usize,
}

#[derive(Debug)]
struct Block {
    buf: HostBuffer,
    /// Free holes: offset → length, never adjacent (coalesced).
    free: BTreeMap<usize, usize>,
}

impl Block {
    fn free_bytes(&self) -> usize {
        self.free.values().sum()
    }
    fn is_empty(&self) -> bool {
        self.free.len() == 1 && self.free.get(&0) == Some(&self.buf.len())
    }
}

/// See the [module documentation](self).
#[derive(Debug, Default)]
pub(crate) struct Arena {
    /// `None` marks a block given back to the backend (indices stay stable).
    blocks: Vec<Option<Block>>,
    /// Bytes of all blocks held.
    reserved: u64,
    /// Bytes in extents handed out.
    used: u64,
}

/// Rounds `len` up to [`ALIGN`].
pub(crate) fn aligned(len: usize) -> usize {
    len.div_ceil(ALIGN) * ALIGN
}

impl Arena {
    /// Bytes of all blocks held.
    pub(crate) fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Bytes in extents handed out.
    pub(crate) fn used(&self) -> u64 {
        self.used
    }

    /// Bytes in free holes.
    pub(crate) fn free_bytes(&self) -> u64 {
        self.reserved - self.used
    }

    /// Address of the first byte of `e`.
    pub(crate) fn addr(&self, e: &Extent) -> u64 {
        let b = self.blocks[e.block]
            .as_ref()
            .expect("extents only name live blocks");
        b.buf.addr() + e.offset as u64
    }

    /// First fit over every block; `len` must be a multiple of [`ALIGN`].
    pub(crate) fn try_alloc(&mut self, len: usize) -> Option<Extent> {
        debug_assert!(len > 0 && len % ALIGN == 0);
        for (bi, b) in self.blocks.iter_mut().enumerate() {
            let Some(b) = b else { continue };
            let hole = b
                .free
                .iter()
                .find(|(_, &l)| l >= len)
                .map(|(&o, &l)| (o, l));
            if let Some((off, hole_len)) = hole {
                b.free.remove(&off);
                if hole_len > len {
                    b.free.insert(off + len, hole_len - len);
                }
                self.used += len as u64;
                return Some(Extent {
                    block: bi,
                    offset: off,
                    len,
                });
            }
        }
        None
    }

    /// Returns an extent to its block, merging it with adjacent holes.
    pub(crate) fn free(&mut self, e: Extent) {
        let Some(Some(b)) = self.blocks.get_mut(e.block) else {
            debug_assert!(false, "extent of an unknown block");
            return;
        };
        let mut off = e.offset;
        let mut len = e.len;
        if let Some((&po, &pl)) = b.free.range(..off).next_back() {
            if po + pl == off {
                b.free.remove(&po);
                off = po;
                len += pl;
            }
        }
        if let Some(&nl) = b.free.get(&(e.offset + e.len)) {
            b.free.remove(&(e.offset + e.len));
            len += nl;
        }
        b.free.insert(off, len);
        self.used -= e.len as u64;
    }

    /// Adds a block of `len` bytes (a multiple of [`ALIGN`]) from the backend.
    ///
    /// # Errors
    /// The backend's error; nothing changed.
    pub(crate) fn grow(&mut self, backend: &dyn Backend, len: usize) -> Result<()> {
        let buf = backend.alloc_host(len)?;
        self.add_block(buf);
        Ok(())
    }

    /// Adds a block allocated by the caller (outside any lock) from [`Backend::alloc_host`].
    pub(crate) fn add_block(&mut self, buf: HostBuffer) {
        let len = buf.len();
        let block = Block {
            free: BTreeMap::from([(0, buf.len())]),
            buf,
        };
        self.reserved += len as u64;
        match self.blocks.iter().position(Option::is_none) {
            Some(i) => self.blocks[i] = Some(block),
            None => self.blocks.push(Some(block)),
        }
    }

    /// Bytes held by blocks that hold no extent.
    pub(crate) fn empty_block_bytes(&self) -> u64 {
        self.blocks
            .iter()
            .flatten()
            .filter(|b| b.is_empty())
            .map(|b| b.buf.len() as u64)
            .sum()
    }

    /// Gives every block that holds no extent back to the backend. Returns the bytes released.
    pub(crate) fn release_empty(&mut self, backend: &dyn Backend) -> u64 {
        let mut released = 0;
        for slot in &mut self.blocks {
            if slot.as_ref().is_some_and(Block::is_empty) {
                let Some(b) = slot.take() else { continue };
                let len = b.buf.len();
                match backend.free_host(b.buf) {
                    Ok(()) => {
                        released += len as u64;
                    }
                    Err((buf, e)) => {
                        tracing::warn!("freeing a host arena block failed: {e}");
                        *slot = Some(Block { buf, free: b.free });
                    }
                }
            }
        }
        self.reserved -= released;
        released
    }

    /// The largest hole of any block.
    #[cfg(test)]
    pub(crate) fn largest_hole(&self) -> usize {
        self.blocks
            .iter()
            .flatten()
            .flat_map(|b| b.free.values().copied())
            .max()
            .unwrap_or(0)
    }

    /// Gives every block back to the backend (at engine teardown, when no extent is in use by a
    /// transfer).
    pub(crate) fn release_all(&mut self, backend: &dyn Backend) {
        for b in self.blocks.drain(..).flatten() {
            debug_assert!(b.free_bytes() <= b.buf.len());
            if let Err((_, e)) = backend.free_host(b.buf) {
                tracing::warn!("freeing a host arena block failed: {e}");
            }
        }
        self.reserved = 0;
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena_with_block(len: usize) -> Arena {
        // Bookkeeping only: a fake buffer that is never dereferenced.
        Arena {
            blocks: vec![Some(Block {
                buf: HostBuffer::from_raw(1 << 20, len),
                free: BTreeMap::from([(0, len)]),
            })],
            reserved: len as u64,
            used: 0,
        }
    }

    #[test]
    fn first_fit_and_coalescing() {
        let mut a = arena_with_block(10 * ALIGN);
        let x = a.try_alloc(3 * ALIGN).unwrap();
        let y = a.try_alloc(3 * ALIGN).unwrap();
        let z = a.try_alloc(4 * ALIGN).unwrap();
        assert_eq!((x.offset, y.offset, z.offset), (0, 3 * ALIGN, 6 * ALIGN));
        assert!(a.try_alloc(ALIGN).is_none());
        a.free(x);
        a.free(z);
        assert_eq!(a.largest_hole(), 4 * ALIGN);
        assert!(a.try_alloc(5 * ALIGN).is_none());
        a.free(y);
        assert_eq!(a.largest_hole(), 10 * ALIGN);
        assert_eq!(a.used(), 0);
        assert_eq!(a.empty_block_bytes(), 10 * ALIGN as u64);
        assert_eq!(a.try_alloc(10 * ALIGN).unwrap().offset, 0);
    }
}
