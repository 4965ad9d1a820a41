//! The background mapper: after each step it maps the pages the next few decode steps will need,
//! so that the caller's `step` finds them mapped and makes no backend call.
//!
//! A slot asks for work when its mapped pages cover fewer than `lookahead` tokens beyond its live
//! tokens; the mapper then maps every slot up to `2 × lookahead` tokens ahead, so wake-ups come
//! in batches, at most once per `lookahead` steps for a batch growing in lockstep.
//!
//! It sleeps on a condition variable until a step records new targets, maps only what the pool
//! can supply without reclaiming (it never takes pages from anyone), and never holds the cache's
//! lock during a backend call.

use std::sync::Arc;

use super::{attach, Shared};
use crate::cache::stats::mark_background_thread;

pub(super) fn run(sh: Arc<Shared>) {
    mark_background_thread();
    loop {
        let mut st = sh.lock();
        while !st.shutdown && !st.mapper_wake {
            st = sh.mapper_cv.wait(st).unwrap_or_else(|p| p.into_inner());
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
                work.push((i, need, missing));
            }
        }
        if work.is_empty() {
            drop(st);
            sh.changed.notify_all();
            continue;
        }
        for &(i, _, _) in &work {
            st.slots[i].busy = true;
        }
        st.mapper_active = true;
        drop(st);
        let busy: Vec<usize> = work.iter().map(|w| w.0).collect();
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
            Err((_, e, kept)) => {
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
