//! Which guest pages were written since the checker last looked, so that a
//! check re-reads only the free frames that can have changed
//! (`free-frames-scrubbed` at a cost that follows what changed, not the
//! size of guest RAM).
//!
//! Writes reach guest RAM two ways, and both are logged:
//!
//! - **The guest** (any CPU mode, and KVM itself on the guest's behalf):
//!   the read-write memory slots are registered with
//!   `KVM_MEM_LOG_DIRTY_PAGES`, and `KVM_GET_DIRTY_LOG` hands over (and
//!   clears) the pages written since the last call. The guest cannot avoid
//!   it: the hypervisor write-protects the pages, not the guest's tables.
//!   The first harvest turns the log on (re-registers the slots with the
//!   flag) and reports every page written, since nothing before it was
//!   logged: a run that checks once (`--check exit`, the default) never
//!   pays for the log, whose write-protection costs a fault into KVM at the
//!   first write to each page after every harvest.
//! - **The VMM**, through [`GuestRam::write_bytes`], which marks the pages it
//!   writes ([`GuestRam::take_written`]).
//!
//! A frame verified zero stays known zero until a harvest reports a write
//! to it. The argument: a bit is set while the vCPU is stopped, by a check
//! that harvested first; every write after that moment lands in the next
//! harvest (KVM's log and the VMM's both accumulate until taken), and every
//! check harvests before it trusts a bit. If a harvest fails, nothing is
//! trusted and the check reads every free frame, as it does without a log.

use crate::memory::GuestRam;
use crate::vm::register_slot;
use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use std::sync::{Arc, Mutex, PoisonError};
use superos_protocol::layout::PAGE_SIZE;

/// One bit per guest page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
}

impl PageBitmap {
    /// An empty bitmap for `pages` pages.
    pub fn new(pages: u64) -> PageBitmap {
        PageBitmap { words: vec![0; pages.div_ceil(64) as usize] }
    }

    /// Wraps words as KVM and [`GuestRam::take_written`] give them (bit `i`
    /// of word `w` is page `64 * w + i`).
    pub fn from_words(words: Vec<u64>) -> PageBitmap {
        PageBitmap { words }
    }

    /// Whether page `page` is set (false beyond the end).
    pub fn get(&self, page: u64) -> bool {
        self.words.get((page / 64) as usize).is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Sets page `page` (ignored beyond the end).
    pub fn set(&mut self, page: u64) {
        if let Some(word) = self.words.get_mut((page / 64) as usize) {
            *word |= 1 << (page % 64);
        }
    }

    /// Sets pages `first + i` for every bit `i` set in `words`.
    pub fn set_shifted(&mut self, first: u64, words: &[u64]) {
        for (w, &word) in words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                self.set(first + w as u64 * 64 + bit);
                bits &= bits - 1;
            }
        }
    }

    /// Clears every page set in `other`.
    pub fn clear_all_of(&mut self, other: &PageBitmap) {
        for (word, &written) in self.words.iter_mut().zip(&other.words) {
            *word &= !written;
        }
    }

    /// Sets every page.
    pub fn set_all(&mut self) {
        self.words.fill(u64::MAX);
    }

    /// Pages set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Where the writes since the last harvest come from.
pub trait WriteSource: Send + std::fmt::Debug {
    /// Adds every page written since the last call to `written` (and
    /// forgets them); `Err` if that is not known.
    fn harvest(&self, ram: &GuestRam, written: &mut PageBitmap) -> Result<(), String>;
}

/// KVM's dirty log of the read-write slots, and the VMM's own writes.
#[derive(Debug)]
pub struct KvmWriteLog {
    vm: Arc<kvm_ioctls::VmFd>,
    /// Where guest RAM is mapped in the VMM (for re-registering the slots).
    host_address: u64,
    /// `(slot, first guest-physical byte, end, flags)` of each logged slot.
    slots: Vec<(u32, u64, u64, u32)>,
    state: Mutex<LogState>,
}

/// Whether KVM's log is on.
#[derive(Debug)]
enum LogState {
    /// Not yet: the next harvest turns it on.
    Off,
    On,
    /// KVM refused to turn it on (why); every harvest fails with it.
    Refused(String),
}

impl KvmWriteLog {
    /// The log of `slots` of `vm` (guest RAM at `host_address` in the VMM),
    /// off until the first harvest.
    pub fn new(
        vm: Arc<kvm_ioctls::VmFd>,
        host_address: u64,
        slots: Vec<(u32, u64, u64, u32)>,
    ) -> KvmWriteLog {
        KvmWriteLog { vm, host_address, slots, state: Mutex::new(LogState::Off) }
    }

    /// Turns KVM's log on; `Err` (kept) if KVM refuses.
    fn start(&self, state: &mut LogState) -> Result<(), String> {
        for &(slot, start, end, flags) in &self.slots {
            let with_log = flags | KVM_MEM_LOG_DIRTY_PAGES;
            if let Err(error) = register_slot(&self.vm, self.host_address, slot, start, end, with_log) {
                let why = format!("KVM refused to log the writes to memory slot {slot}: {error}");
                *state = LogState::Refused(why.clone());
                return Err(why);
            }
        }
        *state = LogState::On;
        Ok(())
    }
}

impl WriteSource for KvmWriteLog {
    fn harvest(&self, ram: &GuestRam, written: &mut PageBitmap) -> Result<(), String> {
        // The VMM's writes first: a write racing with this harvest is then
        // either taken here or left for the next one, never lost.
        written.set_shifted(0, &ram.take_written());
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &*state {
            LogState::On => {}
            LogState::Refused(why) => return Err(why.clone()),
            LogState::Off => {
                // Nothing before this moment was logged: every page may
                // have been written.
                self.start(&mut state)?;
                written.set_all();
                return Ok(());
            }
        }
        let mut failure = None;
        for &(slot, start, end, _) in &self.slots {
            // Every slot is harvested even after a failure, so that the next
            // harvest starts from a clean log.
            match self.vm.get_dirty_log(slot, (end - start) as usize) {
                Ok(words) => written.set_shifted(start / PAGE_SIZE, &words),
                Err(error) => failure = Some(format!("KVM_GET_DIRTY_LOG of slot {slot}: {error}")),
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

/// The free frames the checker knows are zero, kept true by a
/// [`WriteSource`].
#[derive(Debug)]
pub struct KnownZero {
    source: Box<dyn WriteSource>,
    zero: PageBitmap,
    /// Whether `zero` may be trusted (the last harvest worked).
    trusted: bool,
    /// The last harvest's error, if it failed.
    pub failure: Option<String>,
}

impl KnownZero {
    /// Nothing known yet; `pages` of RAM.
    pub fn new(source: Box<dyn WriteSource>, pages: u64) -> KnownZero {
        KnownZero { source, zero: PageBitmap::new(pages), trusted: false, failure: None }
    }

    /// Takes the writes since the last refresh: pages written are no longer
    /// known zero. Must run (with the vCPU stopped) before a check uses
    /// [`KnownZero::is_zero`].
    pub fn refresh(&mut self, ram: &GuestRam) {
        let mut written = PageBitmap::new(self.zero.words.len() as u64 * 64);
        match self.source.harvest(ram, &mut written) {
            Ok(()) => {
                self.zero.clear_all_of(&written);
                self.trusted = true;
                self.failure = None;
            }
            Err(error) => {
                self.zero = PageBitmap::new(self.zero.words.len() as u64 * 64);
                self.trusted = false;
                self.failure = Some(error);
            }
        }
    }

    /// Whether the frame at `gpa` is known to be zero (needs no reading).
    pub fn is_zero(&self, gpa: u64) -> bool {
        self.trusted && self.zero.get(gpa / PAGE_SIZE)
    }

    /// The frame at `gpa` was read and is zero.
    pub fn mark_zero(&mut self, gpa: u64) {
        self.zero.set(gpa / PAGE_SIZE);
    }

    /// Frames known zero.
    pub fn count(&self) -> u64 {
        if self.trusted {
            self.zero.count()
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Writes the test reports, or a failure.
    #[derive(Debug)]
    struct Scripted(Arc<Mutex<Result<Vec<u64>, String>>>);

    impl WriteSource for Scripted {
        fn harvest(&self, _: &GuestRam, written: &mut PageBitmap) -> Result<(), String> {
            let mut next = self.0.lock().unwrap();
            let pages = std::mem::replace(&mut *next, Ok(Vec::new()))?;
            for page in pages {
                written.set(page);
            }
            Ok(())
        }
    }

    #[test]
    fn bitmap_sets_shifted_words_and_clears() {
        let mut bitmap = PageBitmap::new(200);
        bitmap.set_shifted(3, &[0b1001, 1 << 63]);
        assert!(bitmap.get(3) && bitmap.get(6) && bitmap.get(3 + 127));
        assert_eq!(bitmap.count(), 3);
        bitmap.set(1000);
        assert!(!bitmap.get(1000), "beyond the end is ignored");
        let mut other = PageBitmap::new(200);
        other.set(6);
        bitmap.clear_all_of(&other);
        assert!(!bitmap.get(6) && bitmap.get(3));
    }

    #[test]
    fn a_written_frame_is_no_longer_known_zero() {
        let ram = GuestRam::new(16).unwrap();
        let script = Arc::new(Mutex::new(Ok(Vec::new())));
        let mut known = KnownZero::new(Box::new(Scripted(script.clone())), 4096);
        assert!(!known.is_zero(0x5000), "nothing is known before the first refresh");
        known.refresh(&ram);
        known.mark_zero(0x5000);
        known.mark_zero(0x6000);
        known.refresh(&ram);
        assert!(known.is_zero(0x5000) && known.is_zero(0x6000));
        *script.lock().unwrap() = Ok(vec![5]);
        known.refresh(&ram);
        assert!(!known.is_zero(0x5000) && known.is_zero(0x6000));
        assert_eq!(known.count(), 1);
    }

    #[test]
    fn a_failed_harvest_forgets_everything() {
        let ram = GuestRam::new(16).unwrap();
        let script = Arc::new(Mutex::new(Ok(Vec::new())));
        let mut known = KnownZero::new(Box::new(Scripted(script.clone())), 4096);
        known.refresh(&ram);
        known.mark_zero(0x5000);
        *script.lock().unwrap() = Err("no log".into());
        known.refresh(&ram);
        assert!(!known.is_zero(0x5000));
        assert_eq!(known.failure.as_deref(), Some("no log"));
        known.refresh(&ram);
        assert!(!known.is_zero(0x5000), "what was forgotten is read again, not trusted");
    }

    #[test]
    fn the_vmms_own_writes_are_harvested() {
        let ram = GuestRam::new(16).unwrap();
        ram.write_bytes(0x7ff8, &[1; 16]).unwrap();
        let mut written = PageBitmap::new(4096);
        written.set_shifted(0, &ram.take_written());
        assert!(written.get(7) && written.get(8) && !written.get(9));
        assert_eq!(written.count(), 2);
        assert_eq!(PageBitmap::from_words(ram.take_written()).count(), 0, "taken once");
    }
}
