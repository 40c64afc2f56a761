//! The commit gate and the poison check, in one place: every change to the upper and the
//! work dir is made through a [`Change`], which holds the gate shared and was refused if an
//! fsync of the upper had failed; `verlay commit` holds the gate exclusive ([`Frozen`])
//! while it copies the upper, so the copy is the upper at one instant (docs/ordering.md,
//! "commit").
//!
//! The write methods of the upper exist only on [`Change`], so an operation cannot write
//! without holding the gate or past a failed fsync: the compiler remembers it.

use std::cell::Cell;
use std::ops::Deref;

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::Upper;
use crate::error::Result;

thread_local! {
    /// Address of the commit gate this thread holds shared (0: none). A change that calls
    /// another (create -> copy-up of the parent) must not take the gate twice: parking_lot
    /// blocks a second shared lock while a commit waits for the exclusive one, which would
    /// deadlock.
    static GATE_HELD: Cell<usize> = const { Cell::new(0) };
}

/// The commit gate of one upper.
#[derive(Debug, Default)]
pub struct Gate(RwLock<()>);

/// One change to the upper in progress: the gate held shared (once per thread, however
/// deeply changes nest). Reads of the upper go through it too (it derefs to [`Upper`]).
pub struct Change<'a> {
    upper: &'a Upper,
    _shared: Option<RwLockReadGuard<'a, ()>>,
    prev: usize,
}

impl Drop for Change<'_> {
    fn drop(&mut self) {
        GATE_HELD.with(|h| h.set(self.prev));
    }
}

impl Deref for Change<'_> {
    type Target = Upper;
    fn deref(&self) -> &Upper {
        self.upper
    }
}

/// The exclusive hold of the commit gate: no change to the upper runs or starts while it
/// lives; changes that arrive wait (they are paused, never failed). A read-only mount's
/// freeze holds nothing.
pub struct Frozen<'a> {
    _exclusive: Option<RwLockWriteGuard<'a, ()>>,
}

impl Frozen<'_> {
    /// The freeze of a mount without an upper: nothing to hold.
    pub fn nothing() -> Frozen<'static> {
        Frozen { _exclusive: None }
    }
}

impl Upper {
    /// Start a change: hold the commit gate shared (a no-op when this thread already holds
    /// it) and refuse if an fsync of the upper has failed ([`Upper::check_writable`]).
    /// Must not be called while holding a lock that a holder of the gate may wait for.
    pub fn change(&self) -> Result<Change<'_>> {
        self.check_writable()?;
        let me = &self.gate.0 as *const RwLock<()> as usize;
        let prev = GATE_HELD.with(|h| h.get());
        if prev == me {
            return Ok(Change {
                upper: self,
                _shared: None,
                prev,
            });
        }
        let g = self.gate.0.read();
        GATE_HELD.with(|h| h.set(me));
        Ok(Change {
            upper: self,
            _shared: Some(g),
            prev,
        })
    }

    /// Stop every change to the upper until the returned guard is dropped: waits for the
    /// changes in flight to finish; later ones block (parking_lot's lock is fair, so a
    /// steady stream of writers cannot starve a commit). Reads go on. Must not be called
    /// from a thread that is inside a change.
    pub fn freeze(&self) -> Frozen<'_> {
        Frozen {
            _exclusive: Some(self.gate.0.write()),
        }
    }
}
