//! A driver that calls the C ABI with arbitrary arguments decoded from bytes, for the
//! `ffi_calls` fuzz target and for the fixed-input test in `tests/ffi_abi.rs`.
//!
//! Handles passed are live, destroyed, null or made up; integers are arbitrary; pointers are
//! null or valid (a garbage pointer is undefined behaviour by the C contract, so it is not
//! tried). Caches are small host-backend caches so one input runs in milliseconds.

use std::ffi::c_char;

use super::dlpack::{kvvm_cache_export_dlpack, kvvm_dl_managed_tensor_versioned, kvvm_dlpack_free};
use super::swap::*;
use super::*;

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u32(&mut self) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..4 {
            v = v << 8 | u32::from(self.u8()?);
        }
        Some(v)
    }
    /// A small integer most of the time, an arbitrary one sometimes.
    fn num(&mut self) -> Option<u64> {
        let b = self.u8()?;
        Some(match b >> 6 {
            0..=2 => u64::from(b & 0x3f) * u64::from(self.u8()? % 8 + 1),
            _ => u64::from(self.u32()?) << (b & 0x1f),
        })
    }
}

/// A made-up handle id: far above any id the registry hands out, so that inputs running next
/// to other users of the library (tests in one process) never touch their objects.
fn made_up(k: u8) -> u64 {
    (1 << 63) | u64::from(k).wrapping_mul(0x9e37_79b9)
}

/// Runs the calls `data` encodes and checks what every call returned against the library's
/// documented behaviour. Returns how many of the calls succeeded.
///
/// # Panics
/// When a call breaks its contract (an unknown status value, a success with inconsistent
/// results, a handle that stays valid after destroy): that is what the fuzzer looks for.
pub fn run_calls(data: &[u8]) -> usize {
    let mut b = Bytes(data);
    let mut caches: Vec<kvvm_cache> = Vec::new();
    let mut dead: Vec<kvvm_cache> = Vec::new();
    let mut tensors: Vec<*mut kvvm_dl_managed_tensor_versioned> = Vec::new();
    let mut created = 0;
    let mut swaps: Vec<kvvm_swap> = Vec::new();
    let mut tickets: Vec<kvvm_ticket> = Vec::new();
    let mut copies: Vec<u64> = Vec::new();
    let mut engines = 0;
    let succeeded = std::cell::Cell::new(0usize);
    let check = |s: kvvm_status| {
        assert!(
            kvvm_status::from_raw(s as u32).is_some(),
            "bad status {s:?}"
        );
        // A panic caught at the boundary is still a bug: no input may reach one.
        assert_ne!(s, kvvm_status::KVVM_PANIC, "a call panicked");
        if s == kvvm_status::KVVM_OK {
            succeeded.set(succeeded.get() + 1);
        }
        s
    };
    while let Some(op) = b.u8() {
        // Pick a handle: live, destroyed, null or made up.
        let pick = |b: &mut Bytes<'_>, caches: &[kvvm_cache], dead: &[kvvm_cache]| {
            let k = b.u8().unwrap_or(0);
            match k % 8 {
                0..=4 if !caches.is_empty() => caches[k as usize / 8 % caches.len()],
                5 if !dead.is_empty() => dead[k as usize / 8 % dead.len()],
                6 => kvvm_cache { id: 0 },
                _ => kvvm_cache { id: made_up(k) },
            }
        };
        // Pick a swap engine / ticket / host copy the same way.
        // (Another kind's live id checks that handles are typed.)
        let other = caches.first().map_or(0, |c| c.id);
        let pick_swap = |b: &mut Bytes<'_>, swaps: &[kvvm_swap]| {
            let k = b.u8().unwrap_or(0);
            kvvm_swap {
                id: match k % 5 {
                    0..=2 if !swaps.is_empty() => swaps[k as usize / 5 % swaps.len()].id,
                    3 => other,
                    _ => made_up(k),
                },
            }
        };
        let pick_ticket = |b: &mut Bytes<'_>, tickets: &[kvvm_ticket]| {
            let k = b.u8().unwrap_or(0);
            kvvm_ticket {
                id: match k % 5 {
                    0..=2 if !tickets.is_empty() => tickets[k as usize / 5 % tickets.len()].id,
                    3 => other,
                    _ => made_up(k),
                },
            }
        };
        let pick_copy = |b: &mut Bytes<'_>, copies: &[u64]| {
            let k = b.u8().unwrap_or(0);
            match k % 4 {
                0..=2 if !copies.is_empty() => copies[k as usize / 4 % copies.len()],
                _ => u64::from(k),
            }
        };
        match op % 22 {
            0 if created < 3 => {
                created += 1;
                let mut c = default_config();
                c.backend = kvvm_backend::KVVM_BACKEND_HOST as u32;
                c.host_granularity = 64 << 10;
                // Mostly configurations that work, sometimes arbitrary ones.
                let sane = b.u8().unwrap_or(1) % 8 != 0;
                c.layers = u32::from(b.u8().unwrap_or(0) % 3) + u32::from(sane);
                c.kv_heads = u32::from(b.u8().unwrap_or(0) % 3 + 1);
                c.head_dim = 8 << (b.u8().unwrap_or(0) % 4);
                c.max_slots = u32::from(b.u8().unwrap_or(0) % 5) + u32::from(sane);
                c.max_tokens = b.num().unwrap_or(0) % 2048 + u64::from(sane);
                c.layout = u32::from(b.u8().unwrap_or(0) % if sane { 2 } else { 3 });
                c.dtype = u32::from(b.u8().unwrap_or(0) % if sane { 5 } else { 6 });
                c.budget_bytes = (b.num().unwrap_or(0) % 64 + if sane { 8 } else { 0 }) << 16;
                c.lookahead_steps = u32::from(b.u8().unwrap_or(0) % 2);
                c.struct_size = match b.u8().unwrap_or(0) % 8 {
                    0 if !sane => 40,
                    _ => KVVM_CONFIG_SIZE_V1,
                };
                let mut h = kvvm_cache::default();
                // SAFETY: valid pointers to locals; `struct_size` is at most the struct's size.
                let s = check(unsafe { kvvm_cache_create(&c, &mut h) });
                if s == kvvm_status::KVVM_OK {
                    assert_ne!(h.id, 0);
                    caches.push(h);
                } else {
                    assert_eq!(h.id, 0, "out written on failure");
                }
            }
            1 => {
                let h = pick(&mut b, &caches, &dead);
                let s = check(kvvm_cache_destroy(h));
                if let Some(i) = caches.iter().position(|&c| c == h) {
                    assert_eq!(s, kvvm_status::KVVM_OK);
                    caches.remove(i);
                    dead.push(h);
                    assert_eq!(kvvm_cache_destroy(h), kvvm_status::KVVM_INVALID_HANDLE);
                } else {
                    assert_eq!(s, kvvm_status::KVVM_INVALID_HANDLE);
                }
            }
            2 => {
                let h = pick(&mut b, &caches, &dead);
                let mut slot = u32::MAX;
                let null = b.u8().unwrap_or(0) % 8 == 0;
                let p = if null {
                    std::ptr::null_mut()
                } else {
                    &mut slot
                };
                // SAFETY: `p` is null or a valid local.
                let s = check(unsafe { kvvm_cache_alloc_slot_for(h, b.num().unwrap_or(0), p) });
                if s == kvvm_status::KVVM_OK {
                    assert!(!null && slot != u32::MAX);
                }
            }
            3 => {
                let h = pick(&mut b, &caches, &dead);
                check(kvvm_cache_free_slot(h, b.num().unwrap_or(0) as u32));
            }
            4 => {
                let h = pick(&mut b, &caches, &dead);
                let slot = b.num().unwrap_or(0) as u32;
                let tokens = b.num().unwrap_or(0);
                if check(kvvm_cache_ensure(h, slot, tokens)) == kvvm_status::KVVM_OK {
                    let mut t = 0;
                    // SAFETY: valid local.
                    let s = unsafe { kvvm_cache_tokens(h, slot, &mut t) };
                    assert_eq!(s, kvvm_status::KVVM_OK);
                    assert_eq!(t, tokens);
                }
            }
            5 => {
                let h = pick(&mut b, &caches, &dead);
                let n = usize::from(b.u8().unwrap_or(0) % 4);
                let batch: Vec<kvvm_slot_tokens> = (0..n)
                    .map(|_| kvvm_slot_tokens {
                        slot: b.num().unwrap_or(0) as u32,
                        reserved: 0,
                        tokens: b.num().unwrap_or(0),
                    })
                    .collect();
                let p = if b.u8().unwrap_or(1) == 0 {
                    std::ptr::null()
                } else {
                    batch.as_ptr()
                };
                // SAFETY: `p` is null or valid for `n` entries.
                check(unsafe { kvvm_cache_step(h, p, n) });
            }
            6 => {
                let h = pick(&mut b, &caches, &dead);
                check(kvvm_cache_shrink(
                    h,
                    b.num().unwrap_or(0) as u32,
                    b.num().unwrap_or(0),
                ));
            }
            7 => {
                let h = pick(&mut b, &caches, &dead);
                let slot = b.num().unwrap_or(0) as u32;
                let (mut t, mut c) = (0, 0);
                // SAFETY: valid locals.
                let st = check(unsafe { kvvm_cache_tokens(h, slot, &mut t) });
                // SAFETY: valid locals.
                let sc = check(unsafe { kvvm_cache_capacity(h, slot, &mut c) });
                if st == kvvm_status::KVVM_OK && sc == kvvm_status::KVVM_OK {
                    assert!(t <= c, "tokens {t} above capacity {c}");
                }
            }
            8 => {
                let h = pick(&mut b, &caches, &dead);
                let mut v = std::mem::MaybeUninit::<kvvm_view>::zeroed();
                // SAFETY: valid local.
                let s = check(unsafe {
                    kvvm_cache_layer_view(
                        h,
                        b.num().unwrap_or(0) as u32,
                        u32::from(b.u8().unwrap_or(0) % 3),
                        v.as_mut_ptr(),
                    )
                });
                if s == kvvm_status::KVVM_OK {
                    // SAFETY: written on success.
                    let v = unsafe { v.assume_init() };
                    assert_eq!(v.ndim, 4);
                    assert!(!v.data.is_null());
                }
            }
            9 => {
                let h = pick(&mut b, &caches, &dead);
                let mut r = [kvvm_range::default(); 4];
                let cap = usize::from(b.u8().unwrap_or(0) % 5);
                let mut n = 0usize;
                // SAFETY: `r` holds `cap <= 4` entries.
                let s = check(unsafe {
                    kvvm_cache_slot_ranges(
                        h,
                        b.num().unwrap_or(0) as u32,
                        b.num().unwrap_or(0),
                        r.as_mut_ptr(),
                        cap,
                        &mut n,
                    )
                });
                if s == kvvm_status::KVVM_OK {
                    assert!(n <= cap);
                }
            }
            10 => {
                // Rows are accessed outside the library: no swap may be moving them meanwhile.
                for &s in &swaps {
                    assert_eq!(kvvm_swap_quiesce(s), kvvm_status::KVVM_OK);
                }
                let h = pick(&mut b, &caches, &dead);
                let slot = b.num().unwrap_or(0) as u32;
                let token = b.num().unwrap_or(0);
                let layer = b.num().unwrap_or(0) as u32;
                let kv = u32::from(b.u8().unwrap_or(0) % 3);
                let mut r = kvvm_range::default();
                // SAFETY: valid local.
                if check(unsafe { kvvm_cache_row(h, slot, token, layer, kv, &mut r) })
                    == kvvm_status::KVVM_OK
                {
                    let pattern: Vec<u8> = (0..r.len).map(|i| (i as u8) ^ (token as u8)).collect();
                    let mut back = vec![0u8; r.len as usize];
                    // SAFETY: buffers of the row's size.
                    unsafe {
                        assert_eq!(
                            kvvm_cache_write_row(
                                h,
                                slot,
                                token,
                                layer,
                                kv,
                                pattern.as_ptr(),
                                pattern.len()
                            ),
                            kvvm_status::KVVM_OK
                        );
                        assert_eq!(
                            kvvm_cache_read_row(
                                h,
                                slot,
                                token,
                                layer,
                                kv,
                                back.as_mut_ptr(),
                                back.len()
                            ),
                            kvvm_status::KVVM_OK
                        );
                    }
                    assert_eq!(pattern, back);
                }
            }
            11 => {
                let h = pick(&mut b, &caches, &dead);
                let mut st = kvvm_stats {
                    struct_size: if b.u8().unwrap_or(1) == 0 {
                        8
                    } else {
                        KVVM_STATS_SIZE_V1
                    },
                    ..kvvm_stats::default()
                };
                // SAFETY: valid local of the given size.
                check(unsafe { kvvm_cache_stats(h, &mut st) });
            }
            12 => {
                let h = pick(&mut b, &caches, &dead);
                let slot = match b.u8().unwrap_or(0) % 4 {
                    0 => KVVM_ALL_SLOTS,
                    _ => b.num().unwrap_or(0) as u32,
                };
                let tokens = b.num().unwrap_or(0);
                let mut t = std::ptr::null_mut();
                // SAFETY: valid local.
                let s = check(unsafe {
                    kvvm_cache_export_dlpack(
                        h,
                        b.num().unwrap_or(0) as u32,
                        u32::from(b.u8().unwrap_or(0) % 3),
                        slot,
                        tokens,
                        &mut t,
                    )
                });
                if s == kvvm_status::KVVM_OK {
                    assert!(!t.is_null());
                    tensors.push(t);
                }
            }
            13 => {
                if let Some(t) = tensors.pop() {
                    // SAFETY: an export whose deleter has not run.
                    unsafe { kvvm_dlpack_free(t) };
                }
            }
            14 => {
                let mut buf = [0 as c_char; 16];
                let len = usize::from(b.u8().unwrap_or(0) % 17);
                // SAFETY: `buf` holds `len <= 16` bytes.
                let n = unsafe { kvvm_last_error(buf.as_mut_ptr(), len) };
                if len > 0 {
                    let written = buf.iter().position(|&c| c == 0).unwrap_or(usize::MAX);
                    assert_eq!(written, n.min(len - 1));
                }
                let _ = kvvm_status_name(b.u32().unwrap_or(0));
            }
            15 => {
                let h = pick(&mut b, &caches, &dead);
                check(kvvm_cache_quiesce(h));
            }
            16 if engines < 3 => {
                engines += 1;
                let h = pick(&mut b, &caches, &dead);
                let mut cfg = kvvm_swap_config::default();
                // SAFETY: valid local.
                unsafe { kvvm_swap_config_init(&mut cfg) };
                cfg.host_budget_bytes = (b.num().unwrap_or(0) % 64) << 16;
                cfg.chunk_bytes = b.num().unwrap_or(0) % (1 << 20);
                cfg.max_in_flight = u32::from(b.u8().unwrap_or(0) % 4);
                let mut s = kvvm_swap::default();
                // SAFETY: valid locals.
                if check(unsafe { kvvm_swap_create(h, &cfg, &mut s) }) == kvvm_status::KVVM_OK {
                    swaps.push(s);
                }
            }
            17 => {
                let s = pick_swap(&mut b, &swaps);
                let mut t = kvvm_ticket::default();
                // SAFETY: valid local.
                let st = check(unsafe { kvvm_swap_out(s, b.num().unwrap_or(0) as u32, &mut t) });
                if st == kvvm_status::KVVM_OK {
                    let mut c = 0;
                    // SAFETY: valid local.
                    assert_eq!(unsafe { kvvm_ticket_copy(t, &mut c) }, kvvm_status::KVVM_OK);
                    copies.push(c);
                    tickets.push(t);
                }
            }
            18 => {
                let s = pick_swap(&mut b, &swaps);
                let copy = pick_copy(&mut b, &copies);
                let mut t = kvvm_ticket::default();
                // SAFETY: valid local.
                let st =
                    check(unsafe { kvvm_swap_in(s, copy, b.num().unwrap_or(0) as u32, &mut t) });
                if st == kvvm_status::KVVM_OK {
                    tickets.push(t);
                }
            }
            19 => {
                let t = pick_ticket(&mut b, &tickets);
                let (mut done, mut v) = (0u32, 0u64);
                // SAFETY: valid locals.
                unsafe {
                    match b.u8().unwrap_or(0) % 6 {
                        0 => check(kvvm_ticket_poll(t, &mut done)),
                        1 => check(kvvm_ticket_wait(t)),
                        2 => check(kvvm_ticket_event(t, &mut v)),
                        3 => check(kvvm_ticket_copy(t, &mut v)),
                        4 => check(kvvm_ticket_bytes(t, &mut v)),
                        _ => {
                            let st = check(kvvm_ticket_free(t));
                            if st == kvvm_status::KVVM_OK {
                                tickets.retain(|&x| x != t);
                            }
                            st
                        }
                    };
                }
            }
            20 => {
                let s = pick_swap(&mut b, &swaps);
                let copy = pick_copy(&mut b, &copies);
                let mut v = 0u64;
                let mut st = kvvm_swap_stats {
                    struct_size: KVVM_SWAP_STATS_SIZE_V1,
                    ..Default::default()
                };
                // SAFETY: valid locals.
                unsafe {
                    match b.u8().unwrap_or(0) % 5 {
                        0 => check(kvvm_swap_release(s, copy)),
                        1 => check(kvvm_swap_pin(s, copy, b.u32().unwrap_or(0))),
                        2 => check(kvvm_swap_set_priority(s, copy, b.u32().unwrap_or(0))),
                        3 => check(kvvm_swap_host_tokens(s, copy, &mut v)),
                        _ => check(kvvm_swap_get_stats(s, &mut st)),
                    };
                }
            }
            21 => {
                let s = pick_swap(&mut b, &swaps);
                if check(kvvm_swap_destroy(s)) == kvvm_status::KVVM_OK {
                    swaps.retain(|&x| x != s);
                    assert_eq!(kvvm_swap_destroy(s), kvvm_status::KVVM_INVALID_HANDLE);
                }
            }
            _ => {}
        }
    }
    for t in tickets {
        assert_eq!(kvvm_ticket_free(t), kvvm_status::KVVM_OK);
    }
    for s in swaps {
        assert_eq!(kvvm_swap_destroy(s), kvvm_status::KVVM_OK);
    }
    for t in tensors {
        // SAFETY: exports whose deleters have not run.
        unsafe { kvvm_dlpack_free(t) };
    }
    for h in caches {
        assert_eq!(kvvm_cache_destroy(h), kvvm_status::KVVM_OK);
    }
    succeeded.get()
}
