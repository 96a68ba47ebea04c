//! Who owns a physical frame. The kernel keeps one [`FrameOwner`] per managed
//! frame (encoded as a `u32` with [`FrameOwner::encode`]); the VMM reads the
//! same table from outside to check it against the page tables.
//!
//! Invariant: ownership is assigned when a frame is allocated, never
//! transferred, and released (back to [`FrameOwner::Free`]) only after the
//! frame has been scrubbed.

/// The owner of one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameOwner {
    /// On the free list, zeroed.
    Free,
    /// The kernel itself (its page tables, the gate page, bookkeeping).
    Kernel,
    /// A page-table frame of the process with this pid.
    PageTable(u32),
    /// A private page (image, stack, heap) of the process with this pid.
    Private(u32),
    /// A page of the shared region with this id.
    Shared(u32),
    /// A queued message addressed to the process with this pid.
    Message(u32),
}

const KIND_SHIFT: u32 = 28;
const ID_MASK: u32 = (1 << KIND_SHIFT) - 1;

/// Largest pid or region id an owner can carry.
pub const MAX_OWNER_ID: u32 = ID_MASK;

impl FrameOwner {
    /// Encodes the owner: kind in the top 4 bits, id below. Ids above
    /// [`MAX_OWNER_ID`] are truncated; the kernel never creates them.
    pub const fn encode(self) -> u32 {
        let (kind, id) = match self {
            FrameOwner::Free => (0, 0),
            FrameOwner::Kernel => (1, 0),
            FrameOwner::PageTable(pid) => (2, pid),
            FrameOwner::Private(pid) => (3, pid),
            FrameOwner::Shared(region) => (4, region),
            FrameOwner::Message(pid) => (5, pid),
        };
        (kind << KIND_SHIFT) | (id & ID_MASK)
    }

    /// Decodes an owner; `None` for an unknown kind.
    pub const fn decode(raw: u32) -> Option<FrameOwner> {
        let id = raw & ID_MASK;
        Some(match raw >> KIND_SHIFT {
            0 if id == 0 => FrameOwner::Free,
            1 if id == 0 => FrameOwner::Kernel,
            2 => FrameOwner::PageTable(id),
            3 => FrameOwner::Private(id),
            4 => FrameOwner::Shared(id),
            5 => FrameOwner::Message(id),
            _ => return None,
        })
    }

    /// True for [`FrameOwner::Free`].
    pub const fn is_free(self) -> bool {
        matches!(self, FrameOwner::Free)
    }
}

impl core::fmt::Display for FrameOwner {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameOwner::Free => f.write_str("free"),
            FrameOwner::Kernel => f.write_str("kernel"),
            FrameOwner::PageTable(pid) => write!(f, "page table of pid {pid}"),
            FrameOwner::Private(pid) => write!(f, "private to pid {pid}"),
            FrameOwner::Shared(region) => write!(f, "shared region {region}"),
            FrameOwner::Message(pid) => write!(f, "message to pid {pid}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip_and_free_is_zero() {
        assert_eq!(FrameOwner::Free.encode(), 0);
        for owner in [
            FrameOwner::Free,
            FrameOwner::Kernel,
            FrameOwner::PageTable(7),
            FrameOwner::Private(MAX_OWNER_ID),
            FrameOwner::Shared(3),
            FrameOwner::Message(1),
        ] {
            assert_eq!(FrameOwner::decode(owner.encode()), Some(owner));
        }
        assert_eq!(FrameOwner::decode(0xf000_0000), None);
        assert_eq!(FrameOwner::decode(1), None, "free with an id is corrupt");
    }
}
