//! The kernel's side of a ring the VMM drains (the event ring and the trace
//! ring, `superos_protocol::event` and `superos_protocol::trace`): a header
//! and `N` fixed-size records in one block of kernel memory.
//!
//! The kernel writes the records and `head`, the VMM writes `tail` while a
//! vCPU is stopped in a hypercall; so every operation here takes the tail
//! the caller read afresh (a volatile read, in `kernel::host`) and the
//! logic stays host-testable. A full ring drops the new record and counts
//! it in `lost`: nothing disappears silently, and the VMM is never waited
//! for.

use superos_protocol::event::EventRingHeader;

/// A ring of `N` records of type `R` after the shared header, as the VMM
/// reads it: page-aligned, header first.
#[repr(C, align(4096))]
pub struct Ring<R: Copy, const N: usize> {
    /// The shared header.
    pub header: EventRingHeader,
    /// The record slots: record `n` is in slot `n % N`.
    pub records: [R; N],
}

impl<R: Copy, const N: usize> Ring<R, N> {
    /// An empty ring with `magic` and `version`, every slot `empty`.
    pub const fn new(magic: u32, version: u32, empty: R) -> Self {
        Ring {
            header: EventRingHeader {
                magic,
                version,
                capacity: N as u32,
                record_size: core::mem::size_of::<R>() as u32,
                head: 0,
                tail: 0,
                lost: 0,
                reserved: 0,
            },
            records: [empty; N],
        }
    }

    /// Records written and not yet drained, given the VMM's `tail`.
    pub fn undrained(&self, tail: u64) -> u64 {
        self.header.head.wrapping_sub(tail)
    }

    /// Appends the record `make` builds for sequence number `head`, or
    /// counts it lost if the ring is full (given the VMM's `tail`). True if
    /// it was written.
    pub fn push(&mut self, tail: u64, make: impl FnOnce(u64) -> R) -> bool {
        let head = self.header.head;
        if self.undrained(tail) >= N as u64 {
            self.header.lost += 1;
            return false;
        }
        self.records[(head % N as u64) as usize] = make(head);
        // The record before the head that makes it visible: a VMM that
        // drains while another CPU runs reads the head first.
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
        self.header.head = head.wrapping_add(1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_full_ring_counts_what_it_drops() {
        let mut ring: Ring<u64, 4> = Ring::new(1, 2, 0);
        for n in 0..6 {
            ring.push(0, |seq| seq * 10 + n);
        }
        assert_eq!((ring.header.head, ring.header.lost), (4, 2));
        assert_eq!(ring.records, [0, 11, 22, 33]);
        assert_eq!(ring.undrained(0), 4);
        // The VMM drained two: two more fit, in the slots it freed.
        assert!(ring.push(2, |seq| seq));
        assert!(ring.push(2, |seq| seq));
        assert!(!ring.push(2, |seq| seq));
        assert_eq!(ring.records, [4, 5, 22, 33]);
        assert_eq!((ring.header.capacity, ring.header.record_size), (4, 8));
    }

    proptest! {
        /// Whatever the VMM drains in between, every record is either in
        /// the ring (at `seq % N`) or counted lost, and at most N wait.
        #[test]
        fn written_plus_lost_is_pushed(drains in proptest::collection::vec(0u64..6, 1..40)) {
            let mut ring: Ring<u64, 5> = Ring::new(1, 2, u64::MAX);
            let mut tail = 0u64;
            for (pushed, drain) in (1u64..).zip(drains) {
                tail = (tail + drain).min(ring.header.head);
                if ring.push(tail, |seq| seq) {
                    let head = ring.header.head;
                    prop_assert_eq!(ring.records[((head - 1) % 5) as usize], head - 1);
                }
                prop_assert!(ring.undrained(tail) <= 5);
                prop_assert_eq!(ring.header.head + ring.header.lost, pushed);
            }
        }
    }
}
