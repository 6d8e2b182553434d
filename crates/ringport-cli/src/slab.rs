//! The server's connection table: records in one vector, found by an id that names a slot and
//! the slot's generation. An id kept after its record was freed (in a list of connections to
//! visit, say) finds nothing, even once the slot holds another record. Memory follows the
//! connections held, with no per-record allocation and no hash-table headroom.

/// The table. A record is taken out to be worked on ([`Slab::take`]) and either put back under
/// the same id ([`Slab::put`]) or its slot freed ([`Slab::free`]).
#[derive(Debug)]
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    /// Freed slots, reused most recent first.
    free: Vec<u32>,
    /// Slots in use (holding a record or reserved by `take`).
    used: usize,
}

#[derive(Debug)]
struct Slot<T> {
    gen: u32,
    /// Whether the slot is in use; `value` is `None` while its record is taken out.
    used: bool,
    value: Option<T>,
}

fn split(id: u64) -> (usize, u32) {
    ((id & u64::from(u32::MAX)) as usize, (id >> 32) as u32)
}

impl<T> Slab<T> {
    pub fn new() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            used: 0,
        }
    }

    /// Adds a record and returns its id.
    pub fn insert(&mut self, value: T) -> u64 {
        self.used += 1;
        let index = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                self.slots.push(Slot {
                    gen: 0,
                    used: false,
                    value: None,
                });
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[index];
        slot.used = true;
        slot.value = Some(value);
        (u64::from(slot.gen) << 32) | index as u64
    }

    /// The index of the slot `id` names, if that slot is in use under the id's generation.
    fn index(&self, id: u64) -> Option<usize> {
        let (index, gen) = split(id);
        self.slots
            .get(index)
            .is_some_and(|s| s.used && s.gen == gen)
            .then_some(index)
    }

    fn slot(&mut self, id: u64) -> Option<&mut Slot<T>> {
        let index = self.index(id)?;
        Some(&mut self.slots[index])
    }

    /// Reads the generation of the slot `id` names and discards it. Called for a batch of ids
    /// before they are worked on, so that the slots' cache misses overlap instead of each
    /// stalling in turn (with thousands of connections, a record is out of the cache by the
    /// time its connection is served again).
    pub fn touch(&self, id: u64) {
        if let Some(slot) = self.slots.get(split(id).0) {
            std::hint::black_box(slot.gen);
        }
    }

    /// The record `id` names, if held.
    pub fn get(&self, id: u64) -> Option<&T> {
        self.slots[self.index(id)?].value.as_ref()
    }

    /// Whether `id` names a slot in use: a record held, or one taken out.
    pub fn is_live(&self, id: u64) -> bool {
        self.index(id).is_some()
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        self.slot(id)?.value.as_mut()
    }

    /// Takes the record out, keeping its slot (and id) reserved for [`Slab::put`].
    pub fn take(&mut self, id: u64) -> Option<T> {
        self.slot(id)?.value.take()
    }

    /// Puts a taken record back under its id.
    pub fn put(&mut self, id: u64, value: T) {
        match self.slot(id) {
            Some(slot) => {
                debug_assert!(slot.value.is_none(), "slot {id:#x} is not taken");
                slot.value = Some(value);
            }
            None => debug_assert!(false, "slot {id:#x} was freed while taken"),
        }
    }

    /// Frees the slot of a taken record: its id finds nothing from now on.
    pub fn free(&mut self, id: u64) {
        let (index, _) = split(id);
        if let Some(slot) = self.slot(id) {
            slot.used = false;
            slot.value = None;
            slot.gen = slot.gen.wrapping_add(1);
            self.used -= 1;
            self.free.push(index as u32);
        }
    }

    /// Slots in use, records taken out included.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.used
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// The ids of the records held (not those taken out).
    pub fn ids(&self) -> Vec<u64> {
        self.iter().map(|(id, _)| id).collect()
    }

    /// The records held, with their ids.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            let v = s.value.as_ref()?;
            Some(((u64::from(s.gen) << 32) | i as u64, v))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Slab;

    #[test]
    fn ids_find_their_record_until_freed_even_when_the_slot_is_reused() {
        let mut s = Slab::new();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(s.get_mut(a), Some(&mut "a"));
        assert_eq!(s.len(), 2);

        let taken = s.take(b).unwrap();
        assert_eq!(taken, "b");
        assert_eq!(s.get_mut(b), None, "taken out");
        assert!(s.is_live(b), "a taken record's slot is still in use");
        assert_eq!(s.len(), 2, "a taken record keeps its slot");
        assert_eq!(s.ids(), vec![a]);
        s.put(b, "b2");
        assert_eq!(s.get_mut(b), Some(&mut "b2"));

        assert_eq!(s.take(a), Some("a"));
        s.free(a);
        assert_eq!(s.len(), 1);
        let c = s.insert("c");
        assert_eq!(c & 0xffff_ffff, a & 0xffff_ffff, "the freed slot is reused");
        assert_ne!(c, a);
        assert_eq!(s.get_mut(a), None, "a stale id finds nothing");
        assert!(!s.is_live(a));
        assert_eq!(s.take(a), None);
        s.free(a);
        assert_eq!(s.len(), 2, "freeing by a stale id frees nothing");
        assert_eq!(s.get_mut(c), Some(&mut "c"));

        let mut all: Vec<_> = s.iter().map(|(id, v)| (id, *v)).collect();
        all.sort();
        let mut want = vec![(b, "b2"), (c, "c")];
        want.sort();
        assert_eq!(all, want);
        assert_eq!(s.get_mut(u64::MAX), None);
        assert_eq!(
            (s.get(c), s.get(a), s.get(u64::MAX)),
            (Some(&"c"), None, None)
        );
        // Touching an id with no slot, or a stale one, does not panic.
        s.touch(u64::MAX);
        s.touch(a);
    }
}
