//! Per-process capability tables for shared memory.
//!
//! User space sees only opaque 64-bit handles. A handle encodes a slot index
//! and that slot's generation, scrambled with a per-table key; the kernel
//! accepts it only if the slot is occupied and its generation matches. A slot's
//! generation changes every time it is emptied, so a stale handle (revoked,
//! destroyed) never becomes valid again, and since every table has its own key
//! a handle copied from another process names nothing here.
//!
//! Rights only ever shrink: a capability is derived from another with
//! [`Rights::derive`], which can drop rights but never add them.

use alloc::vec::Vec;
use superos_protocol::syscall::{RIGHTS_ALL, RIGHT_GRANT, RIGHT_READ, RIGHT_WRITE};

/// A set of `RIGHT_*` bits, normalised (write implies read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rights(u64);

impl Rights {
    /// Parses user-supplied rights: nonzero, known bits only; write adds read.
    pub fn from_user(bits: u64) -> Option<Rights> {
        if bits == 0 || bits & !RIGHTS_ALL != 0 {
            return None;
        }
        let bits = if bits & RIGHT_WRITE != 0 { bits | RIGHT_READ } else { bits };
        Some(Rights(bits))
    }

    /// The raw bits.
    pub fn bits(self) -> u64 {
        self.0
    }

    /// True if every right in `other` is in `self`.
    pub fn contains(self, other: Rights) -> bool {
        other.0 & !self.0 == 0
    }

    /// May map readable / writable / grant.
    pub fn can_read(self) -> bool {
        self.0 & RIGHT_READ != 0
    }
    /// May map writable.
    pub fn can_write(self) -> bool {
        self.0 & RIGHT_WRITE != 0
    }
    /// May grant to others.
    pub fn can_grant(self) -> bool {
        self.0 & RIGHT_GRANT != 0
    }

    /// The rights a derived capability gets: `requested` if it is within
    /// `self`, otherwise `None`. Rights can be kept or dropped, never added.
    pub fn derive(self, requested: Rights) -> Option<Rights> {
        self.contains(requested).then_some(requested)
    }
}

/// What a capability grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// The shared region it names.
    pub region: u32,
    /// Its rights.
    pub rights: Rights,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    generation: u32,
    capability: Option<Capability>,
}

/// One process's capabilities.
#[derive(Debug)]
pub struct CapTable {
    slots: Vec<Slot>,
    key: u32,
    capacity: usize,
}

impl CapTable {
    /// An empty table of at most `capacity` capabilities whose handles are
    /// scrambled with `key` (the kernel derives one per process).
    pub fn new(capacity: usize, key: u32) -> Self {
        CapTable { slots: Vec::new(), key, capacity }
    }

    fn handle(&self, index: usize, generation: u32) -> u64 {
        (u64::from(generation ^ self.key) << 32) | (index as u64 + 1)
    }

    /// Stores a capability; `None` if the table is full.
    pub fn insert(&mut self, capability: Capability) -> Option<u64> {
        let index = match self.slots.iter().position(|s| s.capability.is_none()) {
            Some(index) => index,
            None if self.slots.len() < self.capacity => {
                self.slots.push(Slot { generation: 1, capability: None });
                self.slots.len() - 1
            }
            None => return None,
        };
        self.slots[index].capability = Some(capability);
        Some(self.handle(index, self.slots[index].generation))
    }

    fn index_of(&self, handle: u64) -> Option<usize> {
        let index = (handle as u32 as usize).checked_sub(1)?;
        let generation = (handle >> 32) as u32 ^ self.key;
        let slot = self.slots.get(index)?;
        (slot.capability.is_some() && slot.generation == generation).then_some(index)
    }

    /// The capability a handle names, if it is valid in this table.
    pub fn get(&self, handle: u64) -> Option<Capability> {
        self.slots[self.index_of(handle)?].capability
    }

    /// Removes the capability a handle names; the handle (and any copy of it)
    /// is invalid from then on.
    pub fn remove(&mut self, handle: u64) -> Option<Capability> {
        let index = self.index_of(handle)?;
        self.clear(index)
    }

    fn clear(&mut self, index: usize) -> Option<Capability> {
        let slot = &mut self.slots[index];
        slot.generation = slot.generation.wrapping_add(1).max(1);
        slot.capability.take()
    }

    /// Removes the capability for `region`, if the table holds one.
    pub fn remove_region(&mut self, region: u32) -> Option<Capability> {
        let index = self.slots.iter().position(|s| s.capability.is_some_and(|c| c.region == region))?;
        self.clear(index)
    }

    /// The handle and capability for `region`, if held.
    pub fn find_region(&self, region: u32) -> Option<(u64, Capability)> {
        self.slots.iter().enumerate().find_map(|(i, s)| {
            s.capability.filter(|c| c.region == region).map(|c| (self.handle(i, s.generation), c))
        })
    }

    /// Every (handle, capability) held, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Capability)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.capability.map(|c| (self.handle(i, s.generation), c)))
    }

    /// Number of capabilities held.
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.capability.is_some()).count()
    }

    /// True if no capability is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cap(region: u32, bits: u64) -> Capability {
        Capability { region, rights: Rights::from_user(bits).unwrap() }
    }

    #[test]
    fn rights_normalise_and_only_shrink() {
        assert_eq!(Rights::from_user(RIGHT_WRITE).unwrap().bits(), RIGHT_READ | RIGHT_WRITE);
        assert_eq!(Rights::from_user(0), None);
        assert_eq!(Rights::from_user(8), None, "there is no execute right");
        let rw = Rights::from_user(RIGHT_READ | RIGHT_WRITE).unwrap();
        let r = Rights::from_user(RIGHT_READ).unwrap();
        let rg = Rights::from_user(RIGHT_READ | RIGHT_GRANT).unwrap();
        assert_eq!(rw.derive(r), Some(r));
        assert_eq!(r.derive(rw), None);
        assert_eq!(rw.derive(rg), None, "grant cannot be added");
        assert!(!rw.can_grant() && rg.can_grant());
    }

    #[test]
    fn stale_and_foreign_handles_are_rejected() {
        let mut a = CapTable::new(4, 0x1234_5678);
        let mut b = CapTable::new(4, 0x9abc_def0);
        let handle = a.insert(cap(1, RIGHT_READ)).unwrap();
        let other = b.insert(cap(2, RIGHT_READ)).unwrap();
        assert_eq!(a.get(handle), Some(cap(1, RIGHT_READ)));
        assert_eq!(b.get(handle), None, "a handle means nothing in another table");
        assert_eq!(a.get(other), None);
        assert_eq!(a.remove(handle), Some(cap(1, RIGHT_READ)));
        assert_eq!(a.get(handle), None, "revoked");
        let reused = a.insert(cap(3, RIGHT_READ)).unwrap();
        assert_ne!(reused, handle, "the slot is reused with a new generation");
        assert_eq!(a.get(handle), None, "the stale handle stays invalid");
        assert_eq!(a.get(0), None);
        assert_eq!(a.get(u64::MAX), None);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut table = CapTable::new(2, 7);
        assert!(table.insert(cap(1, 1)).is_some());
        assert!(table.insert(cap(2, 1)).is_some());
        assert_eq!(table.insert(cap(3, 1)), None);
        assert_eq!(table.remove_region(1), Some(cap(1, 1)));
        assert!(table.insert(cap(3, 1)).is_some());
        assert_eq!(table.len(), 2);
        assert_eq!(table.find_region(3).map(|(_, c)| c), Some(cap(3, 1)));
    }

    proptest! {
        /// Guessing: random handles are never accepted unless they are
        /// exactly a handle the table gave out and has not revoked.
        #[test]
        fn guessed_handles_never_validate(guesses in prop::collection::vec(any::<u64>(), 1..200), key in any::<u32>()) {
            let mut table = CapTable::new(8, key);
            let issued: Vec<u64> = (0..5).map(|r| table.insert(cap(r, 1)).unwrap()).collect();
            let revoked = issued[2];
            table.remove(revoked);
            for guess in guesses {
                let valid = table.get(guess).is_some();
                prop_assert_eq!(valid, issued.contains(&guess) && guess != revoked);
            }
        }
    }
}
