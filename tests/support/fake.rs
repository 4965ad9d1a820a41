//! The fake CUDA driver (`tests/fixtures/fakecuda.c`) for the tests that load it: building and
//! loading it, its test controls, the fake kernel, and one test's exclusive use of it
//! ([`Session`], `session!`).
#![allow(dead_code)]

use std::ffi::{c_char, c_int, c_longlong, c_uint, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use libloading::Library;

use kvvm_sys::{CUfunction, CUstream};

use crate::fakecuda_build;

/// The granularity the fake is set to: small pages keep the tests small.
pub const G: usize = 64 << 10;
/// The device memory the fake reports by default.
pub const TOTAL_MEM: usize = 16 << 30;

/// Live object kinds of the fake that must be back to zero after every test.
pub const LIVE_KINDS: [&str; 10] = [
    "handles",
    "allocations",
    "mappings",
    "reservations",
    "host",
    "device",
    "streams",
    "events",
    "contexts",
    "pending",
];

pub type CountFn = unsafe extern "C" fn(*const c_char) -> c_longlong;

/// The fake kernel's parameters (`struct fakecuda_kernel` in the fixture): at execution, after
/// `delay_us`, `read_len` bytes at device address `read` go to host memory `read_out` (if not
/// null), then `write_len` bytes at `write` are set from `write_in` (or to `write_byte`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FakeKernel {
    pub read: u64,
    pub read_len: u64,
    pub read_out: *mut u8,
    pub write: u64,
    pub write_len: u64,
    pub write_in: *const u8,
    pub write_byte: c_int,
    pub delay_us: c_uint,
}
const _: () = assert!(std::mem::size_of::<FakeKernel>() == 56);

impl FakeKernel {
    /// A kernel that reads `[addr, addr+len)` for `delay_us` (an attention kernel).
    pub fn reads(addr: u64, len: usize, delay_us: u32) -> Self {
        FakeKernel {
            read: addr,
            read_len: len as u64,
            read_out: std::ptr::null_mut(),
            write: 0,
            write_len: 0,
            write_in: std::ptr::null(),
            write_byte: 0,
            delay_us,
        }
    }

    /// A kernel that sets `[addr, addr+len)` to `byte` after `delay_us` (a KV write).
    pub fn writes(addr: u64, len: usize, byte: u8, delay_us: u32) -> Self {
        FakeKernel {
            write: addr,
            write_len: len as u64,
            write_byte: c_int::from(byte),
            ..FakeKernel::reads(0, 0, delay_us)
        }
    }
}
pub type FailFn = unsafe extern "C" fn(*const c_char, c_int, c_uint) -> c_int;

/// The fake driver library and its test controls.
pub struct Fake {
    pub path: PathBuf,
    pub calls: CountFn,
    pub live: CountFn,
    pub fail_nth: FailFn,
    pub fail_from: FailFn,
    pub clear_faults: unsafe extern "C" fn(),
    pub hold: unsafe extern "C" fn(c_int),
    pub set_async: unsafe extern "C" fn(c_int) -> c_int,
    pub set_granularity: unsafe extern "C" fn(usize) -> c_int,
    pub set_total_mem: unsafe extern "C" fn(usize),
    pub set_vmm_supported: unsafe extern "C" fn(c_int),
    pub launch: unsafe extern "C" fn(CUstream, *const FakeKernel) -> c_uint,
    pub kernel_function: unsafe extern "C" fn() -> CUfunction,
    pub set_delays: unsafe extern "C" fn(c_uint, c_uint, c_uint),
    pub _lib: Library,
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in a name")
}

impl Fake {
    /// Calls of driver entry point `function` so far.
    pub fn calls(&self, function: &str) -> i64 {
        let name = cstr(function);
        // SAFETY: `name` is a NUL-terminated string alive for the call; the function only reads it.
        let n = unsafe { (self.calls)(name.as_ptr()) };
        assert!(n >= 0, "the fake has no entry point {function}");
        n
    }

    /// Live objects (or events since load) of kind `what`.
    pub fn live(&self, what: &str) -> i64 {
        let name = cstr(what);
        // SAFETY: as in `calls`.
        let n = unsafe { (self.live)(name.as_ptr()) };
        assert!(n >= 0, "the fake counts no {what}");
        n
    }

    /// The `n`-th next call of `function` fails with `code` (once).
    pub fn fail_nth(&self, function: &str, n: i32, code: u32) {
        let name = cstr(function);
        // SAFETY: as in `calls`.
        let rc = unsafe { (self.fail_nth)(name.as_ptr(), n, code) };
        assert_eq!(rc, 0, "cannot arm a fault in {function}");
    }

    /// The `n`-th next call of `function` and every later one fail with `code`.
    pub fn fail_from(&self, function: &str, n: i32, code: u32) {
        let name = cstr(function);
        // SAFETY: as in `calls`.
        let rc = unsafe { (self.fail_from)(name.as_ptr(), n, code) };
        assert_eq!(rc, 0, "cannot arm a fault in {function}");
    }

    pub fn clear_faults(&self) {
        // SAFETY: takes no arguments; only touches the fake's own state.
        unsafe { (self.clear_faults)() }
    }

    /// While held, asynchronous copies queue instead of running; releasing runs them.
    pub fn hold(&self, on: bool) {
        // SAFETY: takes a plain integer; only touches the fake's own state.
        unsafe { (self.hold)(c_int::from(on)) }
    }

    /// With `on`, queued copies run on the fake's device thread at unpredictable times instead
    /// of at submission.
    pub fn set_async(&self, on: bool) {
        // SAFETY: takes a plain integer; only touches the fake's own state.
        let rc = unsafe { (self.set_async)(c_int::from(on)) };
        assert_eq!(rc, 0, "the fake's device thread cannot start");
    }

    /// Sets the granularity; only possible while nothing is reserved or created.
    pub fn set_granularity(&self, bytes: usize) -> bool {
        // SAFETY: takes a plain integer; only touches the fake's own state.
        unsafe { (self.set_granularity)(bytes) == 0 }
    }

    pub fn set_total_mem(&self, bytes: usize) {
        // SAFETY: takes a plain integer; only touches the fake's own state.
        unsafe { (self.set_total_mem)(bytes) }
    }

    pub fn set_vmm_supported(&self, on: bool) {
        // SAFETY: takes a plain integer; only touches the fake's own state.
        unsafe { (self.set_vmm_supported)(c_int::from(on)) }
    }

    /// Enqueues the fake kernel `k` on `stream`.
    ///
    /// # Safety
    /// `stream` must be live (or null); host memory `k` names must stay valid until the kernel
    /// has run. Device addresses are checked by the fake when the kernel runs.
    pub unsafe fn launch(&self, stream: CUstream, k: &FakeKernel) {
        // SAFETY: forwarded from this function's contract; `k` is read during the call only.
        let rc = unsafe { (self.launch)(stream, k) };
        assert_eq!(rc, 0, "fakecuda_launch failed");
    }

    /// Asynchronous mode's timing: up to `max_pause_us` between two operations of a stream, up
    /// to `jitter_us` more than its delay for each kernel; `seed` restarts the random sequence.
    pub fn set_delays(&self, max_pause_us: u32, jitter_us: u32, seed: u32) {
        // SAFETY: takes plain integers; only touches the fake's own state.
        unsafe { (self.set_delays)(max_pause_us, jitter_us, seed) }
    }

    /// Every live object count.
    pub fn live_counts(&self) -> Vec<(&'static str, i64)> {
        LIVE_KINDS.iter().map(|&k| (k, self.live(k))).collect()
    }
}

/// Builds and loads the fake, and points kvvm-sys at it before its first use of the driver.
pub fn load() -> Option<Fake> {
    let path = match fakecuda_build::build() {
        Ok(Some(p)) => p,
        Ok(None) => {
            eprintln!("no C compiler (cc, or $CC) found: the fake CUDA driver cannot be built");
            return None;
        }
        Err(e) => panic!("{e}"),
    };
    // Only this function sets the variable, once per process, before anything loads the driver.
    std::env::set_var(kvvm_sys::LIBCUDA_ENV, &path);
    // SAFETY: the fake's only initialiser sets up a condition variable and reads an environment
    // variable.
    let lib = unsafe { Library::new(&path) }.expect("loading the fake driver");
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the fixture defines this symbol with exactly the field's signature.
            *unsafe { lib.get($name.as_bytes()) }.expect(concat!("fake symbol ", $name))
        };
    }
    let fake = Fake {
        calls: sym!("fakecuda_calls"),
        live: sym!("fakecuda_live"),
        fail_nth: sym!("fakecuda_fail_nth"),
        fail_from: sym!("fakecuda_fail_from"),
        clear_faults: sym!("fakecuda_clear_faults"),
        hold: sym!("fakecuda_hold"),
        set_async: sym!("fakecuda_set_async"),
        set_granularity: sym!("fakecuda_set_granularity"),
        set_total_mem: sym!("fakecuda_set_total_mem"),
        set_vmm_supported: sym!("fakecuda_set_vmm_supported"),
        launch: sym!("fakecuda_launch"),
        kernel_function: sym!("fakecuda_kernel_function"),
        set_delays: sym!("fakecuda_set_delays"),
        path,
        _lib: lib,
    };
    assert!(fake.set_granularity(G));
    let d = kvvm_sys::driver().expect("kvvm-sys loads the fake driver");
    assert_eq!(
        Path::new(d.path()),
        fake.path,
        "kvvm-sys loaded another driver (was it used before KVVM_LIBCUDA was set?)"
    );
    Some(fake)
}

pub static FAKE: OnceLock<Option<Fake>> = OnceLock::new();
pub static SERIAL: Mutex<()> = Mutex::new(());

/// One test's exclusive use of the fake.
pub struct Session {
    pub fake: &'static Fake,
    pub faults: i64,
    pub pageable: i64,
    pub stale: i64,
    pub busy: i64,
    pub _serial: MutexGuard<'static, ()>,
}

impl std::ops::Deref for Session {
    type Target = Fake;
    fn deref(&self) -> &Fake {
        self.fake
    }
}

impl Session {
    pub fn start() -> Option<Session> {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let fake = FAKE.get_or_init(load).as_ref()?;
        fake.clear_faults();
        fake.hold(false);
        fake.set_async(false);
        fake.set_delays(200, 0, 0);
        // Fails only if an earlier test left objects behind, which that test reports.
        fake.set_granularity(G);
        fake.set_vmm_supported(true);
        fake.set_total_mem(TOTAL_MEM);
        Some(Session {
            fake,
            faults: fake.live("faults"),
            pageable: fake.live("pageable_async"),
            stale: fake.live("stale_reads"),
            busy: fake.live("unmap_busy"),
            _serial: serial,
        })
    }

    /// Checks that every driver object is gone and that, during the test, no copy or kernel
    /// touched an unmapped range, no copy used pageable host memory, no copy read a range before
    /// an earlier kernel wrote it, and no range was unmapped under queued work.
    pub fn finish(self) {
        self.clear_faults();
        self.hold(false);
        self.set_async(false);
        for (kind, n) in self.live_counts() {
            assert_eq!(n, 0, "{n} {kind} left in the fake driver");
        }
        assert_eq!(
            self.live("faults"),
            self.faults,
            "a copy or kernel found its device range unmapped"
        );
        assert_eq!(
            self.live("stale_reads"),
            self.stale,
            "a copy read device memory before a kernel submitted earlier wrote it"
        );
        assert_eq!(
            self.live("unmap_busy"),
            self.busy,
            "a range was unmapped while queued or running work still used it"
        );
        assert_eq!(
            self.live("pageable_async"),
            self.pageable,
            "an asynchronous copy used memory that is not page-locked"
        );
    }
}

macro_rules! session {
    () => {
        match Session::start() {
            Some(s) => s,
            None => {
                eprintln!("skipped: no C compiler to build tests/fixtures/fakecuda.c");
                return;
            }
        }
    };
}

pub fn fill(addr: u64, len: usize, seed: u8) {
    // SAFETY: callers pass a range mapped read/write; the fake's device addresses are addresses
    // of this process.
    let s = unsafe { std::slice::from_raw_parts_mut(addr as usize as *mut u8, len) };
    for (i, b) in s.iter_mut().enumerate() {
        *b = seed.wrapping_add((i % 251) as u8);
    }
}

pub fn holds(addr: u64, len: usize, seed: u8) -> bool {
    // SAFETY: callers pass a range that is mapped readable (or host memory they own).
    let s = unsafe { std::slice::from_raw_parts(addr as usize as *const u8, len) };
    s.iter()
        .enumerate()
        .all(|(i, &b)| b == seed.wrapping_add((i % 251) as u8))
}
