//! A worker's table of operations in flight.
//!
//! Operations a worker submits for itself get ids that name a slot of a slab, with the slot's
//! generation, so that an id kept after its operation completed finds nothing when the slot is
//! reused: looking one up is an index, and the table holds no hash-map headroom, which matters
//! when every idle connection keeps an armed receive in it. The slot freed last is reused
//! first, so the slots in use stay few and in the cache however many were free (a load
//! generator with 10,000 connections, a receive and a send in flight on each, spent 2.6% of
//! its time in the cache misses of reserving the oldest free slot, 0.4% reserving the newest).
//! The generation has 27 bits, so an id comes back only after its slot went round 2^27 times:
//! at a million operations a second on one slot, about two minutes, which is why an id must not
//! be used once its operation has completed (see `OpId`). Operations forwarded from other
//! threads carry ids drawn from the port's shared sequence before the worker sees them; those
//! live in a hash map.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::op::IdHasher;

/// In an id: set for slab ids (sequence ids stay below it, see `LOCAL_SEQ_LIMIT`).
const LOCAL: u64 = 1 << 47;
/// Bits of an id that name the slot (a worker tracks up to 2^20 of its own operations in the
/// slab; more go to the map with sequence ids).
const INDEX_BITS: u32 = 20;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
/// Bits of the generation kept in an id (between the index and `LOCAL`).
const GEN_MASK: u32 = (1 << (47 - INDEX_BITS)) - 1;

/// Whether `id` (without its worker bits) names a slab slot.
pub(crate) fn is_local(id: u64) -> bool {
    id & LOCAL != 0
}

pub(crate) struct Inflight<T> {
    slots: Vec<Slot<T>>,
    /// Free slots, the one freed last on top.
    free: Vec<u32>,
    map: HashMap<u64, T, BuildHasherDefault<IdHasher>>,
    /// Records held (reserved slots not counted).
    len: usize,
}

struct Slot<T> {
    gen: u32,
    /// Reserved or holding a record.
    used: bool,
    value: Option<T>,
}

impl<T> Slot<T> {
    /// Frees the slot: the next id that names it carries the next generation.
    fn vacate(&mut self) {
        self.used = false;
        self.value = None;
        self.gen = (self.gen + 1) & GEN_MASK;
    }
}

/// The slot a slab id names (a dense index: at most as many as the worker's operations in
/// flight at once); `None` for a sequence id.
pub(crate) fn slot_index(id: u64) -> Option<usize> {
    is_local(id).then_some((id & INDEX_MASK) as usize)
}

/// The slot index and generation a slab id names; `None` for a sequence id.
fn decode(id: u64) -> Option<(usize, u32)> {
    let index = (id & INDEX_MASK) as usize;
    let gen = ((id >> INDEX_BITS) as u32) & GEN_MASK;
    is_local(id).then_some((index, gen))
}

impl<T> Inflight<T> {
    pub(crate) fn new() -> Self {
        Inflight {
            slots: Vec::new(),
            free: Vec::new(),
            map: HashMap::default(),
            len: 0,
        }
    }

    /// Reserves a slot and returns its id, with `worker_bits` (the worker's part of every id)
    /// set; `None` when every slot an id can name is in use (the caller then uses a sequence
    /// id, which the hash map takes).
    pub(crate) fn reserve(&mut self, worker_bits: u64) -> Option<u64> {
        let index = match self.free.pop() {
            Some(i) => i as usize,
            None if (self.slots.len() as u64) <= INDEX_MASK => {
                self.slots.push(Slot {
                    gen: 0,
                    used: false,
                    value: None,
                });
                self.slots.len() - 1
            }
            None => return None,
        };
        let slot = &mut self.slots[index];
        slot.used = true;
        Some(worker_bits | LOCAL | (u64::from(slot.gen) << INDEX_BITS) | index as u64)
    }

    fn slot(&mut self, id: u64) -> Option<&mut Slot<T>> {
        let (index, gen) = decode(id)?;
        self.slots.get_mut(index).filter(|s| s.used && s.gen == gen)
    }

    /// Gives back a reserved slot that was never filled (the operation completed at once).
    pub(crate) fn unreserve(&mut self, id: u64) {
        if let Some(slot) = self.slot(id).filter(|s| s.value.is_none()) {
            slot.vacate();
            self.free.push((id & INDEX_MASK) as u32);
        }
    }

    /// Adds the record of a started operation: into its reserved slot, or the map. The caller
    /// gives an id that names no record (see `contains`); should one be there all the same, it
    /// is leaked rather than dropped, as the kernel may still use what it owns.
    pub(crate) fn insert(&mut self, id: u64, value: T) {
        // (Each record is in place, or leaked, before a debug build's assertion unwinds.)
        let (displaced, reserved) = if is_local(id) {
            match self.slot(id) {
                Some(slot) => (slot.value.replace(value), true),
                None => (self.map.insert(id, value), false),
            }
        } else {
            (self.map.insert(id, value), true)
        };
        let in_use = displaced.is_some();
        match displaced {
            Some(old) => std::mem::forget(old),
            None => self.len += 1,
        }
        debug_assert!(reserved, "slot of id {id:#x} was not reserved");
        debug_assert!(!in_use, "id {id:#x} was in use");
    }

    pub(crate) fn get(&self, id: u64) -> Option<&T> {
        decode(id)
            .and_then(|(index, gen)| self.slots.get(index).filter(|s| s.used && s.gen == gen))
            .and_then(|s| s.value.as_ref())
            .or_else(|| self.map.get(&id))
    }

    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        match decode(id) {
            Some((index, gen))
                if self
                    .slots
                    .get(index)
                    .is_some_and(|s| s.used && s.gen == gen && s.value.is_some()) =>
            {
                self.slots[index].value.as_mut()
            }
            _ => self.map.get_mut(&id),
        }
    }

    /// Starts loading the slot a slab id names (see `sys::prefetch`).
    pub(crate) fn prefetch(&self, id: u64) {
        if let Some(slot) = slot_index(id).and_then(|i| self.slots.get(i)) {
            crate::sys::prefetch(slot);
        }
    }

    pub(crate) fn contains(&self, id: u64) -> bool {
        self.get(id).is_some()
    }

    /// Takes a record out; its slot is free again and the id finds nothing from now on.
    pub(crate) fn remove(&mut self, id: u64) -> Option<T> {
        let value = self.take(id)?;
        // A slab id's record is always in its slot (`insert`): the slot is free again.
        if let Some(slot) = self.slot(id) {
            slot.vacate();
            self.free.push((id & INDEX_MASK) as u32);
        }
        Some(value)
    }

    /// Takes a record out but keeps its slot reserved, so that the same id can be inserted
    /// again (an operation started later than posted); `unreserve` frees it if it is not.
    pub(crate) fn take(&mut self, id: u64) -> Option<T> {
        let value = match self.slot(id) {
            Some(slot) => slot.value.take(),
            None => None,
        }
        .or_else(|| self.map.remove(&id));
        if value.is_some() {
            self.len -= 1;
        }
        value
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes every record out.
    pub(crate) fn drain(&mut self) -> Vec<T> {
        let mut all: Vec<T> = self.map.drain().map(|(_, v)| v).collect();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(v) = slot.value.take() {
                slot.vacate();
                self.free.push(i as u32);
                all.push(v);
            }
        }
        self.len = 0;
        all
    }
}

#[cfg(test)]
mod tests {
    use super::{is_local, Inflight, GEN_MASK};

    #[test]
    fn a_slot_generation_wraps_and_the_old_id_still_finds_nothing() {
        let mut t = Inflight::new();
        let a = t.reserve(0).unwrap();
        t.insert(a, "a");
        assert_eq!(t.remove(a), Some("a"));
        // Skip to the last generation, then once more round: it wraps to 0.
        t.slots[0].gen = GEN_MASK;
        let last = t.reserve(0).unwrap();
        t.insert(last, "last");
        assert_eq!(t.remove(last), Some("last"));
        assert_eq!(t.slots[0].gen, 0, "wrapped");
        let b = t.reserve(0).unwrap();
        t.insert(b, "b");
        assert_ne!(b, last);
        assert_eq!(t.get(last), None, "the last generation's id finds nothing");
        assert_eq!(t.get(b), Some(&"b"));
    }

    #[test]
    fn the_slot_freed_last_is_reused_first() {
        let mut t = Inflight::new();
        let ids: Vec<u64> = (0..4).map(|_| t.reserve(0).unwrap()).collect();
        for (i, &id) in ids.iter().enumerate() {
            t.insert(id, i);
        }
        t.remove(ids[0]);
        t.remove(ids[2]);
        let next = t.reserve(0).unwrap();
        assert_eq!(next & 0xf_ffff, ids[2] & 0xf_ffff, "the slot freed last");
        assert_eq!(t.reserve(0).unwrap() & 0xf_ffff, ids[0] & 0xf_ffff);
        assert_eq!(t.reserve(0).unwrap() & 0xf_ffff, 4, "then a new one");
    }

    #[test]
    fn drain_skips_slots_reserved_but_not_filled() {
        let mut t = Inflight::new();
        let a = t.reserve(0).unwrap();
        let reserved = t.reserve(0).unwrap();
        t.insert(a, 1);
        assert_eq!(t.drain(), vec![1]);
        assert!(t.is_empty());
        assert_eq!(t.get(a), None);
        // The reservation is still its owner's to give back or fill.
        t.insert(reserved, 2);
        assert_eq!(t.remove(reserved), Some(2));
    }

    const W: u64 = 3 << 48;

    #[test]
    fn slab_ids_find_their_record_until_removed_even_once_the_slot_is_reused() {
        let mut t = Inflight::new();
        let a = t.reserve(W).unwrap();
        assert!(is_local(a));
        assert_eq!(a >> 48, 3, "the worker's bits are kept");
        assert!(!t.contains(a), "reserved, not filled");
        t.insert(a, "a");
        let b = t.reserve(W).unwrap();
        t.insert(b, "b");
        assert_eq!((t.get(a), t.get(b), t.len()), (Some(&"a"), Some(&"b"), 2));

        assert_eq!(t.remove(a), Some("a"));
        assert_eq!(t.remove(a), None, "removed once");
        let c = t.reserve(W).unwrap();
        assert_eq!(c & 0xf_ffff, a & 0xf_ffff, "the slot is reused");
        assert_ne!(c, a);
        t.insert(c, "c");
        assert_eq!(t.get(a), None, "a stale id finds nothing");
        assert_eq!(t.get(c), Some(&"c"));

        // A reservation given back frees the slot; unreserving a filled slot does nothing.
        let d = t.reserve(W).unwrap();
        t.unreserve(d);
        t.unreserve(c);
        assert_eq!(t.get(c), Some(&"c"));
        assert_eq!(t.reserve(W).unwrap() & 0xf_ffff, d & 0xf_ffff);

        // Sequence ids (forwarded from other threads) go to the map.
        let seq = W | 12345;
        assert!(!is_local(seq));
        t.insert(seq, "s");
        assert_eq!((t.get(seq), t.len()), (Some(&"s"), 3));
        let mut all = t.drain();
        all.sort_unstable();
        assert_eq!(all, ["b", "c", "s"]);
        assert!(t.is_empty());
        assert_eq!(t.get(b), None);
    }
}
