//! The prefix index: full pages of published slots, under chained content keys.
//!
//! See [`page_key`] for the keys and `docs/prefix-sharing.md` for the contract.

use std::collections::{BinaryHeap, HashMap};

use crate::vmm::PageHandle;

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The key of one page given its parent's key (0 for page 0), the namespace and the page's tokens.
///
/// Page `i` of a token sequence has the key
///
/// ```text
/// key(-1) = 0
/// key(i)  = FNV-1a-64( le64(key(i-1)) ‖ le64(namespace) ‖ le32(token) for each token of page i )
/// ```
///
/// FNV-1a 64 (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`) is fixed by this
/// definition and does not depend on the platform, the Rust version or the process, so keys
/// computed elsewhere (by [`prefix_keys`] in another process, or by a caller that hashes the same
/// bytes itself) match. The namespace separates models, adapters or anything else that makes
/// equal token ids produce different KV. Callers may also bring their own per-page keys (for
/// example from block hashes a trace or a router already has); those must follow the same
/// chaining rule: equal keys promise equal KV.
///
/// When tokens are known, the cache also keeps them and compares them on lookup, together with
/// the page's position and its parent's key, so a hash collision is a miss, never someone
/// else's KV.
///
/// ```
/// let tokens: Vec<u32> = (0..40).collect();
/// let keys = kvvm::prefix_keys(&tokens, 16, 7); // two full pages of 16 tokens
/// assert_eq!(keys.len(), 2);
/// assert_eq!(keys[0], kvvm::page_key(0, 7, &tokens[..16]));
/// assert_eq!(keys[1], kvvm::page_key(keys[0], 7, &tokens[16..32]));
/// ```
pub fn page_key(parent: u64, namespace: u64, tokens: &[u32]) -> u64 {
    let mut h = fnv1a(FNV_OFFSET, &parent.to_le_bytes());
    h = fnv1a(h, &namespace.to_le_bytes());
    for t in tokens {
        h = fnv1a(h, &t.to_le_bytes());
    }
    h
}

/// The keys of every full page of `tokens` with `tokens_per_page` tokens per page (a trailing
/// partial page has no key).
pub fn prefix_keys(tokens: &[u32], tokens_per_page: usize, namespace: u64) -> Vec<u64> {
    if tokens_per_page == 0 {
        return Vec::new();
    }
    let mut parent = 0;
    tokens
        .chunks_exact(tokens_per_page)
        .map(|page| {
            parent = page_key(parent, namespace, page);
            parent
        })
        .collect()
}

/// Counters of the prefix index (part of [`super::CacheStats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PrefixStats {
    /// Page indices the index holds (each is one page per buffer).
    pub cached_pages: usize,
    /// Of `cached_pages`, those no allocated slot maps: reclaimable, evicted first under pressure.
    pub reclaimable_pages: usize,
    /// Lookups made by `alloc_slot_with_prefix`.
    pub lookups: u64,
    /// Lookups that reused at least one page.
    pub hits: u64,
    /// Tokens reused by hits.
    pub hit_tokens: u64,
    /// Bytes of pages mapped by hits instead of being filled again (pages × buffers × page size).
    pub bytes_saved: u64,
    /// Page indices published into the index.
    pub published_pages: u64,
    /// Page indices evicted from the index.
    pub evicted_pages: u64,
}

/// One cached page index.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Key of the page before (None for page 0).
    pub parent: Option<u64>,
    /// Position of the page in its sequence.
    pub depth: usize,
    /// The index's own reference to the page of every buffer.
    pub pages: Vec<PageHandle>,
    /// The page's tokens, when the publisher gave them (compared on lookup).
    pub tokens: Option<Box<[u32]>>,
    /// Entries whose parent is this one.
    pub children: u32,
    /// Logical time of the last publish or hit.
    pub last_used: u64,
}

/// What a lookup or publish names: a page's key and, if known, its tokens.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PageRef<'a> {
    pub key: u64,
    pub tokens: Option<&'a [u32]>,
}

/// The index. Lives inside the cache's state, under its lock.
#[derive(Debug, Default)]
pub(crate) struct PrefixIndex {
    pub entries: HashMap<u64, Entry>,
    pub tick: u64,
    pub stats: PrefixStats,
}

impl PrefixIndex {
    /// The longest chain of `pages` present in the index: the keys of its entries, in order.
    /// Marks them used.
    pub fn lookup(&mut self, pages: &[PageRef<'_>]) -> Vec<u64> {
        let mut out = Vec::new();
        let mut parent = None;
        for (depth, p) in pages.iter().enumerate() {
            let Some(e) = self.entries.get(&p.key) else {
                break;
            };
            let tokens_match = match (&e.tokens, p.tokens) {
                (Some(a), Some(b)) => **a == *b,
                _ => true,
            };
            if e.depth != depth || e.parent != parent || !tokens_match {
                break;
            }
            out.push(p.key);
            parent = Some(p.key);
        }
        self.tick += 1;
        let t = self.tick;
        for k in &out {
            if let Some(e) = self.entries.get_mut(k) {
                e.last_used = t;
            }
        }
        out
    }

    /// Whether `key` at `depth` with `parent` is present (and matches `tokens` if both known).
    pub fn contains(&self, key: u64) -> bool {
        self.entries.contains_key(&key)
    }

    /// Inserts an entry (the key must be absent) holding `pages`.
    pub fn insert(
        &mut self,
        page: PageRef<'_>,
        parent: Option<u64>,
        depth: usize,
        pages: Vec<PageHandle>,
    ) {
        if let Some(p) = parent.and_then(|k| self.entries.get_mut(&k)) {
            p.children += 1;
        }
        self.tick += 1;
        self.entries.insert(
            page.key,
            Entry {
                parent,
                depth,
                pages,
                tokens: page.tokens.map(Box::from),
                children: 0,
                last_used: self.tick,
            },
        );
        self.stats.published_pages += 1;
    }

    /// Marks `key` used (a publish that found it present).
    pub fn touch(&mut self, key: u64) {
        self.tick += 1;
        let t = self.tick;
        if let Some(e) = self.entries.get_mut(&key) {
            e.last_used = t;
        }
    }

    /// Removes up to `want` entries that `evictable` allows, least recently used chain tails
    /// first (an entry with no cached child; a parent becomes one once its last child is gone),
    /// then, if that is not enough, other evictable entries least recently used first (their
    /// cached children stay, unreachable until the parent is published again). Returns the
    /// removed entries' page handles (the index's references, to be given back to the pool).
    pub fn evict(&mut self, want: usize, evictable: impl Fn(&Entry) -> bool) -> Vec<PageHandle> {
        let mut out = Vec::new();
        if want == 0 {
            return out;
        }
        // (has children, last used, key): tails first, oldest first.
        type Candidate = std::cmp::Reverse<(bool, u64, u64)>;
        let candidate = |k: u64, e: &Entry| std::cmp::Reverse((e.children > 0, e.last_used, k));
        let mut heap: BinaryHeap<Candidate> = self
            .entries
            .iter()
            .filter(|(_, e)| evictable(e))
            .map(|(&k, e)| candidate(k, e))
            .collect();
        let mut removed = 0;
        while removed < want {
            let Some(std::cmp::Reverse((had_children, _, k))) = heap.pop() else {
                break;
            };
            let Some(e) = self.entries.get(&k) else {
                continue;
            };
            if had_children && e.children == 0 {
                // It became a tail after it was queued and is queued again as one.
                continue;
            }
            let Some(e) = self.entries.remove(&k) else {
                continue;
            };
            removed += 1;
            self.stats.evicted_pages += 1;
            if let Some(pk) = e.parent {
                if let Some(p) = self.entries.get_mut(&pk) {
                    p.children = p.children.saturating_sub(1);
                    if p.children == 0 && evictable(p) {
                        heap.push(candidate(pk, p));
                    }
                }
            }
            out.extend(e.pages);
        }
        out
    }

    /// Removes every entry; returns the handles.
    pub fn drain(&mut self) -> Vec<PageHandle> {
        self.entries.drain().flat_map(|(_, e)| e.pages).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // From the FNV reference test suite (draft-eastlake-fnv): "" and "a" and "foobar".
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn keys_chain_and_depend_on_namespace() {
        let t: Vec<u32> = (0..40).collect();
        let k = prefix_keys(&t, 16, 7);
        assert_eq!(k.len(), 2);
        assert_eq!(k[0], page_key(0, 7, &t[..16]));
        assert_eq!(k[1], page_key(k[0], 7, &t[16..32]));
        assert_ne!(prefix_keys(&t, 16, 8)[0], k[0]);
        // The same page content after a different first page has another key.
        let mut u = t.clone();
        u[0] = 99;
        assert_ne!(prefix_keys(&u, 16, 7)[1], k[1]);
    }

    fn entry_pages(n: u64) -> Vec<PageHandle> {
        vec![PageHandle::from_raw(n, 4096)]
    }

    #[test]
    fn eviction_takes_least_recently_used_tails_first() {
        let mut ix = PrefixIndex::default();
        let t: Vec<u32> = (0..64).collect();
        let a = prefix_keys(&t[..48], 16, 0); // chain a0 <- a1 <- a2
        let b = prefix_keys(&t[16..48], 16, 0); // chain b0 <- b1
        for (j, &k) in a.iter().enumerate() {
            let parent = j.checked_sub(1).map(|p| a[p]);
            ix.insert(
                PageRef {
                    key: k,
                    tokens: None,
                },
                parent,
                j,
                entry_pages(j as u64),
            );
        }
        for (j, &k) in b.iter().enumerate() {
            let parent = j.checked_sub(1).map(|p| b[p]);
            ix.insert(
                PageRef {
                    key: k,
                    tokens: None,
                },
                parent,
                j,
                entry_pages(10 + j as u64),
            );
        }
        // A lookup of chain a makes it the most recently used.
        let refs: Vec<PageRef<'_>> = a.iter().map(|&key| PageRef { key, tokens: None }).collect();
        assert_eq!(ix.lookup(&refs).len(), 3);
        // Tails of the least recently used chain (b) go first, then a's from its tail.
        let order: Vec<u64> = ix.evict(5, |_| true).iter().map(PageHandle::raw).collect();
        assert_eq!(order, vec![11, 10, 2, 1, 0]);
        assert!(ix.entries.is_empty());
        // An entry the predicate protects (a page a live slot maps) is never evicted, and its
        // parent is taken only after every evictable tail.
        for (j, &k) in a.iter().enumerate() {
            let parent = j.checked_sub(1).map(|p| a[p]);
            ix.insert(
                PageRef {
                    key: k,
                    tokens: None,
                },
                parent,
                j,
                entry_pages(j as u64),
            );
        }
        let live = a[2];
        let got: Vec<u64> = ix
            .evict(3, |e| e.pages[0].raw() != 2)
            .iter()
            .map(PageHandle::raw)
            .collect();
        assert_eq!(
            got,
            vec![0, 1],
            "the live tail stays; its index-only ancestors go after every evictable tail"
        );
        assert!(ix.entries.contains_key(&live));
    }
}
