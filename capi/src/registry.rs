//! The handle registry: ids handed to C map to reference-counted objects.
//!
//! Ids count up from 1 and are never reused, so a destroyed handle stays invalid forever, and a
//! made-up id is found only if it happens to equal a live one of the right kind (no undefined
//! behaviour either way). Lookups clone the `Arc` and release the lock at once, so calls on
//! different handles (and on the same one) run concurrently; destroying a handle while another
//! thread uses it only drops the registry's reference.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once};

use crate::{kvvm_status, FfiError, FfiResult};
use kvvm::KvCache;
use kvvm::{SwapEngine, SwapTicket};

/// An object a handle refers to.
#[derive(Debug, Clone)]
pub(crate) enum Object {
    /// A cache (`kvvm_cache`).
    Cache(Arc<KvCache>),
    /// A swap engine (`kvvm_swap`).
    Swap(Arc<SwapEngine>),
    /// A swap ticket (`kvvm_ticket`).
    Ticket(Arc<SwapTicket>),
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Objects by id, with the fork generation (see [`kvvm::fork_generation`]) they were made in.
static OBJECTS: Mutex<Objects> = Mutex::new(BTreeMap::new());

type Objects = BTreeMap<u64, (u64, Object)>;

fn objects() -> MutexGuard<'static, Objects> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: registers plain functions that live for the whole process; they lock and
        // unlock a mutex on the forking thread only (see `lock_before_fork`).
        let rc = unsafe {
            libc::pthread_atfork(
                Some(lock_before_fork),
                Some(unlock_after_fork),
                Some(unlock_after_fork),
            )
        };
        if rc != 0 {
            tracing::warn!(
                "pthread_atfork failed ({rc}): a child forked while another thread uses the \
                 registry may block in its first kvvm call"
            );
        }
    });
    OBJECTS.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// The registry lock, held by the forking thread across `fork()`.
    static HELD_ACROSS_FORK: RefCell<Option<MutexGuard<'static, Objects>>> =
        const { RefCell::new(None) };
}

/// `pthread_atfork` prepare handler: takes the registry lock, so that no other thread holds it
/// at the moment of the fork. (A child inherits only the forking thread: a lock another thread
/// held then would stay locked in the child forever, and its first kvvm call would hang.) The
/// lock is held only for map operations, never while calling out, so this waits briefly.
extern "C" fn lock_before_fork() {
    let g = OBJECTS.lock().unwrap_or_else(|p| p.into_inner());
    HELD_ACROSS_FORK.with(|h| *h.borrow_mut() = Some(g));
}

/// `pthread_atfork` parent and child handler: releases the lock taken by [`lock_before_fork`]
/// (in the child, on its only thread, which is the one that took it).
extern "C" fn unlock_after_fork() {
    HELD_ACROSS_FORK.with(|h| drop(h.borrow_mut().take()));
}

/// Registers an object and returns its new id (never 0).
pub(crate) fn insert(o: Object) -> u64 {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    objects().insert(id, (kvvm::fork_generation(), o));
    id
}

fn inherited(kind: &str, id: u64) -> FfiError {
    FfiError::new(
        kvvm_status::KVVM_STATUS_INVALID_ARGUMENT,
        format!(
            "{kind} handle {id} was created in the parent process; after fork() it cannot be \
             used in the child (create a new one there)"
        ),
    )
}

fn invalid(kind: &str, id: u64) -> FfiError {
    if id == 0 {
        FfiError::new(
            kvvm_status::KVVM_STATUS_INVALID_HANDLE,
            format!("null {kind} handle"),
        )
    } else {
        FfiError::new(
            kvvm_status::KVVM_STATUS_INVALID_HANDLE,
            format!("{kind} handle {id} is not valid (destroyed, or never created)"),
        )
    }
}

/// Looks up an object, checking its kind with `pick`.
pub(crate) fn get<T>(id: u64, kind: &str, pick: impl FnOnce(&Object) -> Option<T>) -> FfiResult<T> {
    let generation = kvvm::fork_generation();
    let map = objects();
    let (made, o) = map.get(&id).ok_or_else(|| invalid(kind, id))?;
    if *made != generation {
        return Err(inherited(kind, id));
    }
    pick(o).ok_or_else(|| invalid(kind, id))
}

/// Removes an object of the kind `pick` accepts and returns it (dropped by the caller outside
/// the registry lock: dropping a cache joins its mapper thread); `None` when the object was
/// inherited from a parent process and is forgotten instead.
pub(crate) fn remove<T>(
    id: u64,
    kind: &str,
    pick: impl Fn(&Object) -> Option<T>,
) -> FfiResult<Option<T>> {
    let generation = kvvm::fork_generation();
    let mut map = objects();
    let (made, v) = map
        .get(&id)
        .and_then(|(made, o)| pick(o).map(|v| (*made, v)))
        .ok_or_else(|| invalid(kind, id))?;
    map.remove(&id);
    if made != generation {
        // Freeing an inherited handle in the child only forgets it: the objects' drops do
        // nothing there either, and the parent's pages stay as they are.
        std::mem::forget(v);
        return Ok(None);
    }
    Ok(Some(v))
}

/// The cache with handle `id`.
pub(crate) fn get_cache(id: u64) -> FfiResult<Arc<KvCache>> {
    get(id, "cache", |o| match o {
        Object::Cache(c) => Some(c.clone()),
        _ => None,
    })
}

/// Removes the cache with handle `id`.
pub(crate) fn remove_cache(id: u64) -> FfiResult {
    let c = remove(id, "cache", |o| match o {
        Object::Cache(c) => Some(c.clone()),
        _ => None,
    })?;
    drop(c);
    Ok(())
}

/// The swap engine with handle `id`.
pub(crate) fn get_swap(id: u64) -> FfiResult<Arc<SwapEngine>> {
    get(id, "swap engine", |o| match o {
        Object::Swap(s) => Some(s.clone()),
        _ => None,
    })
}

/// Removes the swap engine with handle `id` (dropped outside the lock: dropping the last
/// reference waits for its transfers).
pub(crate) fn remove_swap(id: u64) -> FfiResult {
    let s = remove(id, "swap engine", |o| match o {
        Object::Swap(s) => Some(s.clone()),
        _ => None,
    })?;
    drop(s);
    Ok(())
}

/// The ticket with handle `id`.
pub(crate) fn get_ticket(id: u64) -> FfiResult<Arc<SwapTicket>> {
    get(id, "ticket", |o| match o {
        Object::Ticket(t) => Some(t.clone()),
        _ => None,
    })
}

/// Removes the ticket with handle `id`.
pub(crate) fn remove_ticket(id: u64) -> FfiResult {
    let t = remove(id, "ticket", |o| match o {
        Object::Ticket(t) => Some(t.clone()),
        _ => None,
    })?;
    drop(t);
    Ok(())
}
