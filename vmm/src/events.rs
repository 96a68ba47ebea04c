//! Draining the kernel's rings from guest memory: the event ring (see
//! `superos_protocol::event`) and the trace ring (`superos_protocol::trace`),
//! one reader for both. A ring's location comes from the kernel (its boot
//! hello, its first trace notify); every field read from it is validated,
//! and a corrupt ring is an error, not a reason to trust the guest.

use crate::memory::{GuestRam, MemoryError};
use std::marker::PhantomData;
use superos_protocol::event::{EventRecord, EventRingHeader, EVENT_RING_MAGIC};
use superos_protocol::trace::{TraceRecord, TRACE_RING_MAGIC};
use superos_protocol::PROTOCOL_VERSION;
use thiserror::Error;
use zerocopy::{FromBytes, Immutable, KnownLayout};

/// A record type a ring holds.
pub trait RingRecord: FromBytes + Immutable + KnownLayout + Copy {
    /// The ring header's magic.
    const MAGIC: u32;
    /// The ring's name in messages.
    const NAME: &'static str;
    /// The most records such a ring may have.
    const MAX_CAPACITY: u32;
}

impl RingRecord for EventRecord {
    const MAGIC: u32 = EVENT_RING_MAGIC;
    const NAME: &'static str = "event ring";
    const MAX_CAPACITY: u32 = u32::MAX;
}

impl RingRecord for TraceRecord {
    const MAGIC: u32 = TRACE_RING_MAGIC;
    const NAME: &'static str = "trace ring";
    const MAX_CAPACITY: u32 = superos_protocol::trace::TRACE_RING_MAX_CAPACITY;
}

/// Why a ring could not be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EventRingError {
    /// The header is not a header of this ring of our protocol version.
    #[error("{ring} at {gpa:#x} has a bad header (magic {magic:#x}, version {version}, record size {record_size})")]
    BadHeader {
        /// Which ring.
        ring: &'static str,
        /// Ring address.
        gpa: u64,
        /// Magic found.
        magic: u32,
        /// Version found.
        version: u32,
        /// Record size found.
        record_size: u32,
    },
    /// The ring does not fit where the kernel said it is.
    #[error("{ring} at {gpa:#x} with {capacity} records does not fit in {bytes} bytes of guest memory")]
    BadSize {
        /// Which ring.
        ring: &'static str,
        /// Ring address.
        gpa: u64,
        /// Capacity claimed.
        capacity: u32,
        /// Bytes announced.
        bytes: u64,
    },
    /// `head` is behind `tail` or more than a full ring ahead.
    #[error("{ring} indices are inconsistent: head {head}, tail {tail}, capacity {capacity}")]
    BadIndices {
        /// Which ring.
        ring: &'static str,
        /// Head found.
        head: u64,
        /// Tail expected.
        tail: u64,
        /// Capacity.
        capacity: u32,
    },
    /// Reading guest memory failed.
    #[error("ring: {0}")]
    Memory(String),
}

impl From<MemoryError> for EventRingError {
    fn from(error: MemoryError) -> Self {
        EventRingError::Memory(error.to_string())
    }
}

/// A validated ring location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring<R> {
    gpa: u64,
    capacity: u32,
    /// Records consumed so far (the VMM's copy of `tail`).
    tail: u64,
    /// Lost-record count last seen.
    lost: u64,
    record: PhantomData<R>,
}

/// The kernel's event ring.
pub type EventRing = Ring<EventRecord>;
/// The kernel's trace ring (`run --trace`).
pub type TraceRing = Ring<TraceRecord>;

/// What one drain produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Drained<R> {
    /// New records, oldest first.
    pub records: Vec<R>,
    /// Records the kernel dropped since the last drain.
    pub newly_lost: u64,
    /// The kernel's lost-record count went backwards (`(was, now)`): it
    /// cannot be believed; reported, never taken as "nothing lost".
    pub lost_backwards: Option<(u64, u64)>,
}

const HEADER_SIZE: u64 = core::mem::size_of::<EventRingHeader>() as u64;

impl<R: RingRecord> Ring<R> {
    const RECORD_SIZE: u64 = core::mem::size_of::<R>() as u64;

    /// Validates the ring the kernel announced at `gpa` (`bytes` long).
    pub fn open(ram: &GuestRam, gpa: u64, bytes: u64) -> Result<Self, EventRingError> {
        let header: EventRingHeader = ram.read(gpa)?;
        if header.magic != R::MAGIC
            || header.version != PROTOCOL_VERSION
            || u64::from(header.record_size) != Self::RECORD_SIZE
        {
            return Err(EventRingError::BadHeader {
                ring: R::NAME,
                gpa,
                magic: header.magic,
                version: header.version,
                record_size: header.record_size,
            });
        }
        let needed = HEADER_SIZE + u64::from(header.capacity) * Self::RECORD_SIZE;
        if header.capacity == 0
            || header.capacity > R::MAX_CAPACITY
            || needed > bytes
            || !ram.contains(gpa, needed)
        {
            return Err(EventRingError::BadSize { ring: R::NAME, gpa, capacity: header.capacity, bytes });
        }
        Ok(Ring { gpa, capacity: header.capacity, tail: header.tail, lost: header.lost, record: PhantomData })
    }

    /// Where the ring is.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Copies out every record written since the last drain and hands the
    /// slots back to the kernel.
    pub fn drain(&mut self, ram: &GuestRam) -> Result<Drained<R>, EventRingError> {
        self.drain_at_most(ram, u64::MAX)
    }

    /// [`Ring::drain`], but at most `max` records (the oldest); the rest
    /// stay in the ring for the next call. A ring as large as guest RAM is
    /// then drained in bounded pieces.
    pub fn drain_at_most(&mut self, ram: &GuestRam, max: u64) -> Result<Drained<R>, EventRingError> {
        let header: EventRingHeader = ram.read(self.gpa)?;
        let pending = header.head.wrapping_sub(self.tail);
        if pending > u64::from(self.capacity) {
            return Err(EventRingError::BadIndices {
                ring: R::NAME,
                head: header.head,
                tail: self.tail,
                capacity: self.capacity,
            });
        }
        let pending = pending.min(max);
        let mut records = Vec::with_capacity(pending as usize);
        // Counted from the tail, not as a range `tail..head`: the indices
        // are free-running u64s and may cross the wrap (head < tail), which
        // an empty range would drop without a word.
        for i in 0..pending {
            let seq = self.tail.wrapping_add(i);
            let slot = seq % u64::from(self.capacity);
            records.push(ram.read::<R>(self.gpa + HEADER_SIZE + slot * Self::RECORD_SIZE)?);
        }
        self.tail = self.tail.wrapping_add(pending);
        ram.write(self.gpa + core::mem::offset_of!(EventRingHeader, tail) as u64, &self.tail)?;
        let (newly_lost, lost_backwards) = match header.lost.checked_sub(self.lost) {
            Some(newly) => (newly, None),
            None => (0, Some((self.lost, header.lost))),
        };
        self.lost = header.lost;
        Ok(Drained { records, newly_lost, lost_backwards })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use superos_protocol::event::Event;

    const RING: u64 = 0x20_0000;
    const RECORD_SIZE: u64 = EventRing::RECORD_SIZE;

    fn ring_with(ram: &GuestRam, capacity: u32, events: &[Event]) {
        let header = EventRingHeader {
            magic: EVENT_RING_MAGIC,
            version: PROTOCOL_VERSION,
            capacity,
            record_size: RECORD_SIZE as u32,
            head: events.len() as u64,
            ..Default::default()
        };
        ram.write(RING, &header).unwrap();
        for (i, event) in events.iter().enumerate() {
            let mut record = event.encode();
            record.seq = i as u64;
            ram.write(RING + HEADER_SIZE + (i as u64 % capacity as u64) * RECORD_SIZE, &record).unwrap();
        }
    }

    #[test]
    fn drains_records_and_advances_the_tail() {
        let ram = GuestRam::new(16).unwrap();
        let events = [
            Event::HypercallRefused { port: 1, status: 2 },
            Event::ProcessExited { pid: 1, code: 0, preemptions: 0 },
        ];
        ring_with(&ram, 4, &events);
        let mut ring = EventRing::open(&ram, RING, 4096).unwrap();
        let drained = ring.drain(&ram).unwrap();
        let decoded: Vec<Event> = drained.records.iter().map(|r| r.decode().unwrap()).collect();
        assert_eq!(decoded, events);
        let header: EventRingHeader = ram.read(RING).unwrap();
        assert_eq!(header.tail, 2);
        assert!(ring.drain(&ram).unwrap().records.is_empty());
    }

    #[test]
    fn indices_crossing_the_u64_wrap_lose_nothing_and_a_shrinking_lost_count_is_reported() {
        let ram = GuestRam::new(16).unwrap();
        let capacity = 8u32;
        let start = u64::MAX - 2;
        let header = EventRingHeader {
            magic: EVENT_RING_MAGIC,
            version: PROTOCOL_VERSION,
            capacity,
            record_size: RECORD_SIZE as u32,
            head: start,
            tail: start,
            lost: 5,
            ..Default::default()
        };
        ram.write(RING, &header).unwrap();
        let mut ring = EventRing::open(&ram, RING, 4096).unwrap();
        // Five records: seq u64::MAX-2, u64::MAX-1, u64::MAX, 0, 1.
        for i in 0..5u64 {
            let seq = start.wrapping_add(i);
            let mut record = Event::ProcessExited { pid: i as u32 + 1, code: 0, preemptions: 0 }.encode();
            record.seq = seq;
            ram.write(RING + HEADER_SIZE + (seq % u64::from(capacity)) * RECORD_SIZE, &record).unwrap();
        }
        let head = start.wrapping_add(5);
        assert_eq!(head, 2);
        ram.write(RING + core::mem::offset_of!(EventRingHeader, head) as u64, &head).unwrap();
        let drained = ring.drain(&ram).unwrap();
        let seqs: Vec<u64> = drained.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [u64::MAX - 2, u64::MAX - 1, u64::MAX, 0, 1]);
        assert_eq!((drained.newly_lost, drained.lost_backwards), (0, None));
        let header: EventRingHeader = ram.read(RING).unwrap();
        assert_eq!(header.tail, 2);
        // The kernel claims fewer losses than before: reported.
        ram.write(RING + core::mem::offset_of!(EventRingHeader, lost) as u64, &1u64).unwrap();
        let drained = ring.drain(&ram).unwrap();
        assert!(drained.records.is_empty());
        assert_eq!(drained.lost_backwards, Some((5, 1)));
    }

    #[test]
    fn a_ring_is_drained_in_bounded_pieces() {
        let ram = GuestRam::new(16).unwrap();
        let events: Vec<Event> =
            (0..10).map(|pid| Event::ProcessExited { pid, code: 0, preemptions: 0 }).collect();
        ring_with(&ram, 16, &events);
        let mut ring = EventRing::open(&ram, RING, 4096).unwrap();
        let sizes: Vec<usize> = (0..4).map(|_| ring.drain_at_most(&ram, 4).unwrap().records.len()).collect();
        assert_eq!(sizes, [4, 4, 2, 0]);
        let header: EventRingHeader = ram.read(RING).unwrap();
        assert_eq!(header.tail, 10);
    }

    #[test]
    fn corrupt_rings_are_refused() {
        let ram = GuestRam::new(16).unwrap();
        ring_with(&ram, 4, &[]);
        assert!(matches!(EventRing::open(&ram, RING, 100), Err(EventRingError::BadSize { .. })));
        assert!(matches!(EventRing::open(&ram, 15 << 20, 4096), Err(EventRingError::BadHeader { .. })));
        assert!(matches!(EventRing::open(&ram, u64::MAX - 8, 4096), Err(EventRingError::Memory(_))));
        let mut ring = EventRing::open(&ram, RING, 4096).unwrap();
        // The guest claims more records than the ring holds.
        ram.write(RING + core::mem::offset_of!(EventRingHeader, head) as u64, &100u64).unwrap();
        assert!(matches!(ring.drain(&ram), Err(EventRingError::BadIndices { head: 100, .. })));
        // An event ring is not a trace ring.
        assert!(matches!(
            TraceRing::open(&ram, RING, 1 << 20),
            Err(EventRingError::BadHeader { ring: "trace ring", .. })
        ));
    }

    #[test]
    fn a_trace_ring_larger_than_its_maximum_is_refused() {
        let ram = GuestRam::new(16).unwrap();
        let header = EventRingHeader {
            magic: TRACE_RING_MAGIC,
            version: PROTOCOL_VERSION,
            capacity: superos_protocol::trace::TRACE_RING_MAX_CAPACITY + 1,
            record_size: TraceRing::RECORD_SIZE as u32,
            ..Default::default()
        };
        ram.write(RING, &header).unwrap();
        assert!(matches!(TraceRing::open(&ram, RING, 8 << 20), Err(EventRingError::BadSize { .. })));
        ram.write(RING + 8, &4u32).unwrap();
        let mut ring = TraceRing::open(&ram, RING, 8 << 20).unwrap();
        let record = TraceRecord { tsc: 7, kind: 2, cpu: 1, pid: 9, a: 0, b: 0 };
        ram.write(RING + HEADER_SIZE, &record).unwrap();
        ram.write(RING + core::mem::offset_of!(EventRingHeader, head) as u64, &1u64).unwrap();
        assert_eq!(ring.drain(&ram).unwrap().records, [record]);
    }
}
