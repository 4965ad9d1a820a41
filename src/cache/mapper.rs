//! The background mapper: after each step it maps the pages the next few decode steps will need,
//! so that the caller's `step` finds them mapped and makes no backend call.
//!
//! A slot asks for work when its mapped pages cover fewer than `lookahead` tokens beyond its live
//! tokens; the mapper then maps every slot up to `2 × lookahead` tokens ahead, so wake-ups come
//! in batches, at most once per `lookahead` steps for a batch growing in lockstep.
//!
//! In a steady decode loop it also wakes itself (a timed wait on the same condition variable)
//! shortly before the first slot would run short, from the measured step cadence, so that the
//! caller rarely needs to notify it.
//!
//! It sleeps on a condition variable until a step records new targets, maps only what the pool
//! can supply without reclaiming (it never takes pages from anyone), and never holds the cache's
//! lock during a backend call.

use std::sync::Arc;
use std::time::Duration;

use super::{attach, MapFailure, Shared, State, Work};
use crate::vmm::{mark_background_thread, Backend};

pub(super) fn run(sh: Arc<Shared>) {
    mark_background_thread();
    sh.backend.prepare_thread();
    loop {
        let mut st = sh.lock();
        while !st.shutdown && !st.mapper_wake {
            // In a steady decode loop the mapper wakes itself shortly before the first slot
            // would run short, so that the caller never has to notify it (on a virtual machine
            // a futex wake of an idle core costs several microseconds of the caller's step).
            let timeout = if st.clock.steps > st.clock.fence {
                self_wake_in(&sh, &st)
            } else {
                None
            };
            st.mapper_sleeping = true;
            let timed_out = match timeout {
                Some(d) => {
                    let (g, r) = sh
                        .mapper_cv
                        .wait_timeout(st, d)
                        .unwrap_or_else(|p| p.into_inner());
                    st = g;
                    r.timed_out()
                }
                None => {
                    st = sh.mapper_cv.wait(st).unwrap_or_else(|p| p.into_inner());
                    false
                }
            };
            st.mapper_sleeping = false;
            // A quiesced cache is left alone until the next growth call.
            if timed_out && st.clock.steps > st.clock.fence {
                break;
            }
        }
        if st.shutdown {
            return;
        }
        st.mapper_wake = false;
        let available = sh.pool.available();
        let mut total = 0;
        let mut work = Vec::new();
        for (i, s) in st.slots.iter().enumerate() {
            if !s.allocated || s.busy || s.ahead == 0 {
                continue;
            }
            // Top up to twice the look-ahead, so that the next wake-up comes only after at
            // least `lookahead` more steps: the caller wakes the mapper (a futex wake and, on an
            // idle core, an inter-processor interrupt) once per that many steps, not every step.
            let target = (s.ahead + sh.lookahead).min(sh.geometry.max_tokens);
            let need = sh.geometry.pages_for(target);
            let missing = s.missing(need);
            if missing > 0 && total + missing <= available {
                total += missing;
                work.push(Work {
                    slot: i,
                    need,
                    missing,
                });
            }
        }
        if work.is_empty() {
            drop(st);
            sh.changed.notify_all();
            continue;
        }
        for w in &work {
            st.slots[w.slot].busy = true;
        }
        st.mapper_active = true;
        drop(st);
        let busy: Vec<usize> = work.iter().map(|w| w.slot).collect();
        let pages = match sh.acquire(total, false) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!("mapper could not get {total} pages: {e}");
                sh.lock().mapper_active = false;
                sh.finish(&busy);
                continue;
            }
        };
        let plan = sh.plan(&work, pages);
        let (pieces, mapped) = match sh.map_pieces(plan) {
            Ok(done) => (done, total),
            Err(MapFailure { error: e, kept, .. }) => {
                tracing::debug!("mapper failed to map ahead: {e}");
                (kept, 0)
            }
        };
        let mut st = sh.lock();
        attach(&mut st, pieces);
        st.mapper_batches += 1;
        st.mapper_pages += mapped as u64;
        st.mapper_active = false;
        drop(st);
        sh.finish(&busy);
    }
}

/// When to wake up unasked: after three quarters of the steps the batch can still take, at the
/// measured step cadence, before a slot's mapped headroom falls below the look-ahead (when the
/// caller would notify). `None` when the cadence is unknown or a slot is already at that point.
fn self_wake_in(sh: &Shared, st: &State) -> Option<Duration> {
    if st.clock.interval_ns == 0 {
        return None;
    }
    let steps = st
        .slots
        .iter()
        .filter(|s| s.allocated && s.ahead > 0)
        .map(|s| {
            let mapped = sh
                .geometry
                .tokens_in(s.min_pages)
                .min(sh.geometry.max_tokens);
            if mapped >= sh.geometry.max_tokens {
                // Fully mapped: this slot never needs the mapper again.
                return u64::MAX;
            }
            mapped.saturating_sub(s.tokens + sh.lookahead) as u64
        })
        .min()?;
    if steps == 0 || steps == u64::MAX {
        return None;
    }
    let interval = st.clock.interval_ns;
    let last = st.clock.last?;
    let now = std::time::Instant::now();
    if now.saturating_duration_since(last) > Duration::from_nanos(interval.saturating_mul(4)) {
        // The batch stopped stepping: wait to be asked.
        return None;
    }
    // Wake just after a step is expected to end (the last step's time plus a whole number of
    // intervals, plus a twentieth of one), so that the mapping happens while the caller
    // computes rather than during its next step. Never sooner than half an interval: a wake-up
    // that finds nothing new to do must not repeat before the next step can have happened.
    let ahead = (steps * 3 / 4).max(1);
    let due =
        last + Duration::from_nanos(interval.saturating_mul(ahead).saturating_add(interval / 20));
    Some(
        due.saturating_duration_since(now)
            .max(Duration::from_nanos(interval / 2)),
    )
}
