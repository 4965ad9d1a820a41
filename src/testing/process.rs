//! What a process holds of kvvm, read from `/proc/self`: for tests that check what an object
//! keeps alive (threads, files, mappings).

use std::time::{Duration, Instant};

/// kvvm's threads in this process (their names start with `kvvm`).
pub fn kvvm_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("kvvm"))
        .count()
}

/// Open memfds of the host backend's arenas in this process.
pub fn arena_fds() -> usize {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    fds.filter_map(|f| std::fs::read_link(f.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().contains("kvvm-arena"))
        .count()
}

/// Whether `addr` lies in any mapping of the process (reserved ranges included).
pub fn is_mapped(addr: u64) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .any(|(a, b)| a <= addr && addr < b)
}

/// Whether `cond` holds within 2 s: a joined thread leaves `/proc/self/task` a moment after the
/// join returns, and a new thread names itself once it runs.
pub fn settles(cond: impl Fn() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}
