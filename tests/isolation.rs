//! Small isolation defects (issue 16, item 8, core library): host copy ids are unique in the
//! process, so that one swap engine refuses another's id; a thread that cannot be started is
//! reported as such (a resource error), not as a failed copy.

use std::sync::Arc;

use kvvm::testing::stamp_tokens;
use kvvm::vmm::host::{os_page_size, HostBackend, HostConfig};
use kvvm::vmm::Backend;
use kvvm::Error;
use kvvm::{CacheConfig, DType, KvCache, Layout, SwapConfig, SwapEngine};

fn cache() -> Arc<KvCache> {
    let page = os_page_size();
    let host = Arc::new(
        HostBackend::new(HostConfig {
            granularity: page,
            copy_threads: 1,
            ..HostConfig::default()
        })
        .expect("host backend"),
    );
    Arc::new(
        KvCache::with_backend(
            CacheConfig::new(2, 2, 8)
                .with_dtype(DType::F32)
                .with_max_slots(4)
                .with_max_tokens(128)
                .with_layout(Layout::Interleaved)
                .with_budget_bytes((64 * page) as u64)
                .with_lookahead_steps(0),
            host as Arc<dyn Backend>,
        )
        .expect("cache"),
    )
}

fn engine(cache: &Arc<KvCache>) -> SwapEngine {
    SwapEngine::new(
        cache.clone(),
        SwapConfig {
            host_budget_bytes: 4 << 20,
            ..SwapConfig::default()
        },
    )
    .expect("engine")
}

#[test]
fn an_engine_refuses_another_engines_copy_id() {
    let (ca, cb) = (cache(), cache());
    let (ea, eb) = (engine(&ca), engine(&cb));
    let out = |c: &Arc<KvCache>, e: &SwapEngine, tokens: usize, generation: u32| {
        let s = c.alloc_slot().unwrap();
        c.ensure(s, tokens).unwrap();
        // SAFETY: this thread owns the slot, which holds `tokens` tokens.
        unsafe { stamp_tokens(c, s, generation, 0, tokens).unwrap() };
        let t = e.swap_out(s).unwrap();
        t.wait().unwrap();
        t.copy()
    };
    let id_a = out(&ca, &ea, 100, 1);
    let id_b = out(&cb, &eb, 40, 2);
    assert_ne!(id_a, id_b, "two engines handed out the same copy id");
    let slot = cb.alloc_slot().unwrap();
    match eb.swap_in(id_a, slot) {
        Err(Error::InvalidArgument(_)) => {}
        Err(e) => panic!("expected InvalidArgument, got {e:?}"),
        Ok(t) => {
            let _ = t.wait();
            panic!(
                "engine B swapped in engine A's id: slot holds {} tokens",
                cb.tokens(slot).unwrap()
            );
        }
    }
    assert_eq!(cb.tokens(slot).unwrap(), 0);
    assert!(eb.release(id_b).is_ok());
    assert!(eb.release(id_a).is_err(), "B released A's copy");
    assert!(ea.release(id_a).is_ok());
}

/// Starting a thread fails in a child process whose address space is capped: the error names a
/// thread and counts as resource exhaustion, and is not a "copy failed" backend error.
#[test]
fn thread_spawn_failure_is_not_a_copy_failure() {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    // SAFETY: the child only calls kvvm's constructor, setrlimit, the allocator and `_exit`.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(|| {
                let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
                let pages: u64 = statm
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let vsz = pages * os_page_size() as u64;
                let lim = libc::rlimit {
                    rlim_cur: vsz + (1 << 20),
                    rlim_max: vsz + (1 << 20),
                };
                // SAFETY: setrlimit reads the struct passed by reference.
                if unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) } != 0 {
                    return 10;
                }
                match HostBackend::new(HostConfig {
                    granularity: os_page_size(),
                    copy_threads: 4,
                    ..HostConfig::default()
                }) {
                    Ok(_) => 11,
                    Err(e) => {
                        let msg = e.to_string();
                        if msg.contains("copy failed") {
                            12
                        } else if !msg.contains("thread") {
                            13
                        } else if !e.is_exhaustion() {
                            14
                        } else {
                            0
                        }
                    }
                }
            })
            .unwrap_or(99);
            // SAFETY: ends the child at once without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => match waitpid(child, None).expect("waitpid") {
            WaitStatus::Exited(_, code) => assert_eq!(
                code, 0,
                "child outcome (11: spawned anyway, 12: \"copy failed\", 13: no thread named, 14: not an exhaustion)"
            ),
            other => panic!("child: {other:?}"),
        },
    }
}
