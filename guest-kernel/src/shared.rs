//! Shared memory: regions, capability-gated grants, opt-in mappings and
//! immediate revocation (the contract's "Shared Memory Model"). This module
//! holds the whole logic and runs on the host in unit and property tests; the
//! kernel's system calls (`kernel/shm.rs`) only adapt it and log the events it
//! returns. Every step is explicit:
//!
//! 1. `create` allocates the region's frames (owned `Shared(id)`, zeroed) and
//!    gives the creator a capability; nothing is mapped.
//! 2. `grant` offers another process a capability with at most the
//!    granter's rights; the offer is charged to the granter
//!    ([`OFFERS_PER_GRANTER`]) and takes nothing of the receiver's.
//!    `accept` (the receiver's own call) puts the capability in its table:
//!    sharing is opt-in for every participant. Nothing is mapped.
//! 3. `map` maps the region into the caller (owner included) at an address
//!    the kernel picks, with rights within the capability's.
//! 4. `mem_protect` may only reduce a mapping's rights; nothing resizes or
//!    moves a region.
//! 5. `revoke` (the owner, or whoever granted the target) and `destroy`
//!    (owner only) remove mappings and capabilities at once; the revoked
//!    range stays reserved so a later access faults as `use-after-revoke`.
//!    Revocation is transitive: every capability or offer derived from a
//!    revoked (dropped, or exiting) holder's goes in the same call. Frames
//!    are freed only at destroy, after every mapping is gone.
//!
//! Invariants (checked by the property test): every capability in a table
//! names a live region that lists its holder as a holding participant with
//! the same rights, and vice versa; an offered participant holds nothing and
//! maps nothing; every participant's `granted_by` chain runs through holding
//! participants to the owner; a participant's mapping exists exactly when its
//! address space maps the region's frames; every `Shared(id)` frame belongs
//! to live region `id`; nothing leaks.

use crate::address_space::{AddressSpace, Memory, Refusal};
use crate::capability::{CapTable, Capability, Rights};
use crate::paging;
use alloc::vec::Vec;
use superos_protocol::event::{Event, QuotaKind};
use superos_protocol::layout::PAGE_SIZE;
use superos_protocol::ownership::FrameOwner;
use superos_protocol::syscall::{
    CapInfo, SysError, CAPS_MAX, OFFERS_PER_GRANTER, PROT_EXEC, PROT_READ, PROT_WRITE, SHM_MAX,
    SHM_PAGES_MAX, SHM_PARTICIPANTS_MAX, SHM_REGIONS_MAX,
};

/// A process holding a capability for a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Participant {
    /// Its pid.
    pub pid: u32,
    /// Its capability's rights.
    pub rights: Rights,
    /// Where it has the region mapped, and with which `PROT_*`.
    pub mapping: Option<(u64, u64)>,
    /// Whose capability it was derived from (the owner: itself); revoking
    /// that one revokes this one.
    pub granted_by: u32,
    /// Whether it accepted (holds a capability in its table) or has only
    /// been offered one, charged to `granted_by` ([`OFFERS_PER_GRANTER`]).
    pub accepted: bool,
}

/// A live shared region.
#[derive(Debug)]
pub struct SharedRegion {
    /// Region id (`MEM_SHARE:<id>`).
    pub id: u32,
    /// The creating process.
    pub owner: u32,
    /// Its frames, in order.
    pub frames: Vec<u64>,
    /// Everyone holding a capability (the owner first).
    pub participants: Vec<Participant>,
}

impl SharedRegion {
    /// Length in bytes (regions are never empty).
    pub fn byte_len(&self) -> u64 {
        self.frames.len() as u64 * PAGE_SIZE
    }
}

/// A region `shm_create` is building, between its slices: the id it will
/// have, and the frames allocated so far (owned `Shared(id)`, mapped
/// nowhere, not yet a live region).
#[derive(Debug, Default)]
pub struct RegionBuild {
    /// Its id.
    pub id: u32,
    /// Its length (whole pages).
    pub len: u64,
    /// The owner's rights.
    pub rights: Rights,
    /// The frames so far (capacity for all of them reserved).
    pub frames: Vec<u64>,
}

/// Where a sliced `shm_map` stands.
#[derive(Debug, PartialEq, Eq)]
pub enum MapProgress {
    /// Pages from this index on are still to map.
    More(u64),
    /// Every page is mapped: the event to log.
    Done(Event),
}

/// Where a sliced `shm_unmap` stands.
#[derive(Debug, PartialEq, Eq)]
pub enum UnmapProgress {
    /// Pages from this address on are still mapped.
    More(u64),
    /// The mapping is gone: the events to log.
    Done(Vec<Event>),
}

/// What a process brings to a shared-memory operation.
pub struct Holder<'a> {
    /// Its address space.
    pub space: &'a mut AddressSpace,
    /// Its capabilities.
    pub caps: &'a mut CapTable,
}

/// Access to live processes by pid.
pub trait Holders {
    /// The address space and capability table of live process `pid`.
    fn holder(&mut self, pid: u32) -> Option<Holder<'_>>;
}

/// All shared regions.
#[derive(Debug)]
pub struct SharedMemory {
    regions: Vec<SharedRegion>,
    next_id: u32,
    /// Pages of regions being built (`RegionBuild`), counted against
    /// [`SHM_PAGES_MAX`] like live ones.
    building_pages: u64,
    /// `DEBUG_SHALLOW_REVOCATION` (checker self-test): revocation takes
    /// only the named participant, leaving what was derived from it - the
    /// bug `revocation-complete` must catch.
    pub shallow_revocation: bool,
}

impl Default for SharedMemory {
    fn default() -> Self {
        SharedMemory { regions: Vec::new(), next_id: 1, building_pages: 0, shallow_revocation: false }
    }
}

/// The caller's `capabilities` quota: one more capability in `caps`.
fn room_for_a_capability(caps: &CapTable) -> Result<(), Refusal> {
    if caps.len() < CAPS_MAX {
        return Ok(());
    }
    Err(capabilities_refusal(caps))
}

/// The `capabilities` quota refusal of a caller holding `caps`.
fn capabilities_refusal(caps: &CapTable) -> Refusal {
    Refusal::Quota { kind: QuotaKind::Capabilities, requested: caps.len() as u64 + 1, limit: CAPS_MAX as u64 }
}

fn holder<H: Holders>(holders: &mut H, pid: u32) -> Holder<'_> {
    holders.holder(pid).unwrap_or_else(|| panic!("shared memory: pid {pid} is not live"))
}

impl SharedMemory {
    /// The live regions.
    pub fn regions(&self) -> &[SharedRegion] {
        &self.regions
    }

    fn index(&self, id: u32) -> Option<usize> {
        self.regions.iter().position(|r| r.id == id)
    }

    /// The caller's capability for `handle` and the index of its region.
    fn lookup(&self, caps: &CapTable, handle: u64) -> Result<(Capability, usize), SysError> {
        let capability = caps.get(handle).ok_or(SysError::BadHandle)?;
        let index = self.index(capability.region).ok_or(SysError::BadHandle)?;
        Ok((capability, index))
    }

    /// `shm_create(len, rights)` in one go (host tests): returns the
    /// caller's handle.
    pub fn create<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        caller: u32,
        len: u64,
        rights: u64,
    ) -> Result<(u64, Vec<Event>), Refusal> {
        let mut build = self.create_begin(memory, holders, caller, len, rights)?;
        while !self.create_step(memory, &mut build, u64::MAX)? {}
        self.create_finish(memory, holders, caller, build)
    }

    /// The first step of `shm_create(len, rights)`: checks the arguments
    /// and every limit, reserves a region id and the heap for the frame
    /// list. Nothing is charged or visible yet; [`Self::create_step`]
    /// allocates the frames in slices and [`Self::create_finish`] makes the
    /// region live ([`Self::create_abort`] if the caller goes away first).
    pub fn create_begin<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        caller: u32,
        len: u64,
        rights: u64,
    ) -> Result<RegionBuild, Refusal> {
        let rights = Rights::from_user(rights).ok_or(SysError::InvalidArgument)?;
        if len == 0 {
            return Err(SysError::InvalidArgument.into());
        }
        if len > SHM_MAX {
            return Err(SysError::TooLarge.into());
        }
        let len = len.next_multiple_of(PAGE_SIZE);
        let me = holder(holders, caller);
        room_for_a_capability(me.caps)?;
        // Checked now, charged when the region goes live.
        me.space.charge_shared(len)?;
        me.space.uncharge_shared(len);
        // The kernel's own resources: a slot in the region table, and heap
        // for the frame list (fallible, never an allocation failure panic).
        let pages = (len / PAGE_SIZE) as usize;
        let mut frames = Vec::new();
        if !self.room_for(pages as u64)
            || !memory.heap_room(pages * core::mem::size_of::<u64>())
            || frames.try_reserve_exact(pages).is_err()
        {
            return Err(SysError::OutOfMemory.into());
        }
        let id = self.next_id;
        self.next_id += 1;
        self.building_pages += pages as u64;
        Ok(RegionBuild { id, len, rights, frames })
    }

    /// Whether the region table and the page limit ([`SHM_PAGES_MAX`], live
    /// and being built) have room for a region of `pages` more pages.
    fn room_for(&self, pages: u64) -> bool {
        let live_pages: u64 = self.regions.iter().map(|r| r.frames.len() as u64).sum();
        self.regions.len() < SHM_REGIONS_MAX && live_pages + self.building_pages + pages <= SHM_PAGES_MAX
    }

    /// One slice of `shm_create`: allocates frames (owned `Shared(id)`,
    /// zero like every free frame) within `budget` units, 17 a frame.
    /// Returns whether every frame is there. Out of frames: the build is
    /// aborted (its frames freed) and the call refused.
    pub fn create_step<M: Memory>(
        &mut self,
        memory: &mut M,
        build: &mut RegionBuild,
        budget: u64,
    ) -> Result<bool, Refusal> {
        let pages = (build.len / PAGE_SIZE) as usize;
        let mut left = (budget / (paging::ENTRY_UNITS + paging::PRESENT_UNITS)).max(1);
        while build.frames.len() < pages && left > 0 {
            match memory.alloc_frame(FrameOwner::Shared(build.id)) {
                Some(frame) => build.frames.push(frame),
                None => {
                    self.create_abort(memory, core::mem::take(build));
                    return Err(SysError::OutOfMemory.into());
                }
            }
            left -= 1;
        }
        Ok(build.frames.len() == pages)
    }

    /// Gives up a region being built: frees its frames.
    pub fn create_abort<M: Memory>(&mut self, memory: &mut M, build: RegionBuild) {
        self.building_pages -= (build.len / PAGE_SIZE).min(self.building_pages);
        memory.release_frames_later(build.frames);
    }

    /// The last step of `shm_create`: charges the caller, gives it the
    /// capability and makes the region live. Returns the handle.
    pub fn create_finish<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        caller: u32,
        build: RegionBuild,
    ) -> Result<(u64, Vec<Event>), Refusal> {
        self.building_pages -= (build.len / PAGE_SIZE).min(self.building_pages);
        let me = holder(holders, caller);
        // Nothing the caller holds grew while it was rewound (only its own
        // calls add capabilities or charges), and another creator counted
        // this build's pages, so these hold; checked anyway.
        let checked = room_for_a_capability(me.caps).and_then(|()| {
            if self.regions.len() >= SHM_REGIONS_MAX {
                Err(SysError::OutOfMemory.into())
            } else {
                me.space.charge_shared(build.len)
            }
        });
        if let Err(refusal) = checked {
            self.building_pages += build.len / PAGE_SIZE;
            self.create_abort(memory, build);
            return Err(refusal);
        }
        let RegionBuild { id, len, rights, frames } = build;
        let handle =
            me.caps.insert(Capability { region: id, rights }).expect("the table had room (checked above)");
        self.regions.push(SharedRegion {
            id,
            owner: caller,
            frames,
            participants: alloc::vec![Participant {
                pid: caller,
                rights,
                mapping: None,
                granted_by: caller,
                accepted: true,
            }],
        });
        let event = Event::ShmCreated { pid: caller, region: id.into(), len, rights: rights.bits() };
        Ok((handle, alloc::vec![event]))
    }

    /// `shm_grant(handle, target, rights)`: an offer, charged to the caller.
    pub fn grant<H: Holders>(
        &mut self,
        holders: &mut H,
        caller: u32,
        handle: u64,
        target: u64,
        rights: u64,
    ) -> Result<Vec<Event>, Refusal> {
        let (capability, index) = self.lookup(holder(holders, caller).caps, handle)?;
        let requested = Rights::from_user(rights).ok_or(SysError::InvalidArgument)?;
        if !capability.rights.can_grant() {
            return Err(SysError::NotPermitted.into());
        }
        let granted = capability.rights.derive(requested).ok_or(SysError::NotPermitted)?;
        let target = u32::try_from(target).map_err(|_| SysError::NoSuchProcess)?;
        if holders.holder(target).is_none() {
            return Err(SysError::NoSuchProcess.into());
        }
        let region = &self.regions[index];
        if target == caller || region.participants.iter().any(|p| p.pid == target) {
            return Err(SysError::InvalidArgument.into());
        }
        if region.participants.len() >= SHM_PARTICIPANTS_MAX {
            return Err(Refusal::Quota {
                kind: QuotaKind::Capabilities,
                requested: region.participants.len() as u64 + 1,
                limit: SHM_PARTICIPANTS_MAX as u64,
            });
        }
        // Outstanding offers are the granter's: at most OFFERS_PER_GRANTER.
        let offered = self
            .regions
            .iter()
            .flat_map(|r| r.participants.iter())
            .filter(|p| !p.accepted && p.granted_by == caller)
            .count();
        if offered >= OFFERS_PER_GRANTER {
            return Err(Refusal::Quota {
                kind: QuotaKind::Capabilities,
                requested: offered as u64 + 1,
                limit: OFFERS_PER_GRANTER as u64,
            });
        }
        let id = capability.region;
        self.regions[index].participants.push(Participant {
            pid: target,
            rights: granted,
            mapping: None,
            granted_by: caller,
            accepted: false,
        });
        Ok(alloc::vec![Event::ShmGranted {
            pid: caller,
            region: id.into(),
            grantee: target.into(),
            rights: granted.bits(),
        }])
    }

    /// `shm_accept(region)`: the caller takes the capability it was offered
    /// for region `region` into its table; returns its handle.
    pub fn accept<H: Holders>(
        &mut self,
        holders: &mut H,
        caller: u32,
        region: u64,
    ) -> Result<(u64, Vec<Event>), Refusal> {
        let index = u32::try_from(region).ok().and_then(|id| self.index(id)).ok_or(SysError::BadHandle)?;
        let participant = self.regions[index]
            .participants
            .iter()
            .position(|p| p.pid == caller && !p.accepted)
            .ok_or(SysError::BadHandle)?;
        let id = self.regions[index].id;
        let Participant { rights, granted_by, .. } = self.regions[index].participants[participant];
        let mine = holder(holders, caller).caps;
        let refusal = capabilities_refusal(mine);
        let handle = mine.insert(Capability { region: id, rights }).ok_or(refusal)?;
        self.regions[index].participants[participant].accepted = true;
        let event = Event::ShmAccepted {
            pid: caller,
            region: id.into(),
            granter: granted_by.into(),
            rights: rights.bits(),
        };
        Ok((handle, alloc::vec![event]))
    }

    /// `shm_map(handle, prot)` in one go (host tests): returns the address.
    pub fn map<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        caller: u32,
        handle: u64,
        prot: u64,
    ) -> Result<(u64, Vec<Event>), Refusal> {
        let addr = self.map_begin(memory, holders, caller, handle, prot)?;
        match self.map_continue(memory, holders, caller, addr, 0, u64::MAX)? {
            MapProgress::Done(event) => Ok((addr, alloc::vec![event])),
            MapProgress::More(_) => unreachable!("an unlimited slice maps everything"),
        }
    }

    /// The first step of `shm_map(handle, prot)`: checks the capability and
    /// the quotas, charges the mapping and reserves its range (the
    /// participant is mapped there from now on, with no page present yet).
    /// Returns the address; [`Self::map_continue`] maps the pages.
    pub fn map_begin<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        caller: u32,
        handle: u64,
        prot: u64,
    ) -> Result<u64, Refusal> {
        let me = holder(holders, caller);
        let (capability, index) = self.lookup(me.caps, handle)?;
        if prot & PROT_EXEC != 0 {
            return Err(SysError::NotPermitted.into());
        }
        let writable = match prot {
            PROT_READ => false,
            p if p == PROT_READ | PROT_WRITE => true,
            _ => return Err(SysError::InvalidArgument.into()),
        };
        if writable && !capability.rights.can_write() || !capability.rights.can_read() {
            return Err(SysError::NotPermitted.into());
        }
        let region = &mut self.regions[index];
        let participant = region
            .participants
            .iter()
            .position(|p| p.pid == caller)
            .expect("a capability holder participates");
        if region.participants[participant].mapping.is_some() {
            return Err(SysError::AlreadyMapped.into());
        }
        // The owner was charged at creation; others are charged when they map.
        let charge = if region.owner == caller { 0 } else { region.byte_len() };
        me.space.charge_shared(charge)?;
        let addr = match me.space.reserve_shared(memory, region.id, region.frames.len() as u64, writable) {
            Ok(addr) => addr,
            Err(refusal) => {
                me.space.uncharge_shared(charge);
                return Err(refusal);
            }
        };
        region.participants[participant].mapping = Some((addr, prot));
        Ok(addr)
    }

    /// One slice of `shm_map`: maps the caller's mapping at `addr` from page
    /// `from` on, within `budget` units. A mapping revoked (or its region
    /// destroyed) since [`Self::map_begin`] is `bad-handle`; a failure
    /// removes the mapping and its charge.
    pub fn map_continue<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        caller: u32,
        addr: u64,
        from: u64,
        budget: u64,
    ) -> Result<MapProgress, Refusal> {
        let found = self.regions.iter().enumerate().find_map(|(index, r)| {
            r.participants
                .iter()
                .find(|p| p.pid == caller && p.mapping.is_some_and(|(at, _)| at == addr))
                .map(|p| (index, p.mapping.map_or(0, |(_, prot)| prot)))
        });
        let Some((index, prot)) = found else {
            return Err(SysError::BadHandle.into());
        };
        let region = &self.regions[index];
        let from = usize::try_from(from).map_err(|_| SysError::InvalidArgument)?;
        let me = holder(holders, caller);
        match me.space.map_shared_pages(memory, addr, from, &region.frames, budget) {
            Ok(Some(next)) => Ok(MapProgress::More(next as u64)),
            Ok(None) => {
                Ok(MapProgress::Done(Event::ShmMapped { pid: caller, region: region.id.into(), addr, prot }))
            }
            Err(refusal) => {
                self.unmap(memory, holders, caller, addr).map_err(Refusal::from)?;
                Err(refusal)
            }
        }
    }

    /// `shm_unmap(addr)` in one go (host tests).
    pub fn unmap<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        caller: u32,
        addr: u64,
    ) -> Result<Vec<Event>, SysError> {
        match self.unmap_slice(memory, holders, caller, addr, 0, u64::MAX)? {
            UnmapProgress::Done(events) => Ok(events),
            UnmapProgress::More(_) => unreachable!("an unlimited slice unmaps everything"),
        }
    }

    /// One slice of `shm_unmap(addr)`, from `from` on within `budget`
    /// units. Between slices the caller is still a mapped participant (the
    /// pages below `from` are gone); if a revocation took the mapping
    /// meanwhile, the next slice releases the revoked range instead.
    pub fn unmap_slice<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        caller: u32,
        addr: u64,
        from: u64,
        budget: u64,
    ) -> Result<UnmapProgress, SysError> {
        let me = holder(holders, caller);
        if let Some(id) = me.space.release_revoked(addr) {
            // What a revocation left: released, nothing else changes.
            return Ok(UnmapProgress::Done(alloc::vec![Event::ShmUnmapped {
                pid: caller,
                region: id.into(),
                addr
            }]));
        }
        let (id, len, resume) = me.space.unmap_shared_slice(memory, addr, from, budget)?;
        if let Some(resume) = resume {
            return Ok(UnmapProgress::More(resume));
        }
        if let Some(index) = self.index(id) {
            let region = &mut self.regions[index];
            if let Some(participant) = region.participants.iter_mut().find(|p| p.pid == caller) {
                participant.mapping = None;
            }
            if region.owner != caller {
                me.space.uncharge_shared(len);
            }
        }
        Ok(UnmapProgress::Done(alloc::vec![Event::ShmUnmapped { pid: caller, region: id.into(), addr }]))
    }

    /// `cap_drop(handle)`: the caller gives its capability up (not the
    /// owner: it destroys). Its mapping becomes a revoked range.
    pub fn drop_capability<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        caller: u32,
        handle: u64,
    ) -> Result<Vec<Event>, SysError> {
        let (_, index) = self.lookup(holder(holders, caller).caps, handle)?;
        if self.regions[index].owner == caller {
            return Err(SysError::NotPermitted);
        }
        Ok(self.revoke_participant(memory, holders, index, caller, caller))
    }

    /// `shm_revoke(handle, target)`: the owner, or the target's granter.
    pub fn revoke<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        caller: u32,
        handle: u64,
        target: u64,
    ) -> Result<Vec<Event>, SysError> {
        let (_, index) = self.lookup(holder(holders, caller).caps, handle)?;
        let region = &self.regions[index];
        // Not the owner: only what the caller granted, whatever the target
        // argument is (not-permitted before invalid-argument).
        let participant = u32::try_from(target)
            .ok()
            .and_then(|target| region.participants.iter().find(|p| p.pid == target && target != caller));
        let Some(&Participant { pid: target, granted_by, .. }) = participant else {
            return Err(if region.owner == caller {
                SysError::InvalidArgument
            } else {
                SysError::NotPermitted
            });
        };
        if region.owner != caller && granted_by != caller {
            return Err(SysError::NotPermitted);
        }
        Ok(self.revoke_participant(memory, holders, index, target, caller))
    }

    /// `shm_destroy(handle)`: owner only.
    pub fn destroy<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        caller: u32,
        handle: u64,
    ) -> Result<Vec<Event>, SysError> {
        let (_, index) = self.lookup(holder(holders, caller).caps, handle)?;
        if self.regions[index].owner != caller {
            return Err(SysError::NotPermitted);
        }
        Ok(self.destroy_region(memory, holders, index, caller))
    }

    /// `cap_list`: the caller's capabilities, in table order.
    pub fn cap_infos<'a>(&'a self, caller: u32, caps: &'a CapTable) -> impl Iterator<Item = CapInfo> + 'a {
        caps.iter().filter_map(move |(handle, capability)| {
            let region = &self.regions[self.index(capability.region)?];
            let mapped_at = region
                .participants
                .iter()
                .find(|p| p.pid == caller)
                .and_then(|p| p.mapping)
                .map_or(0, |(addr, _)| addr);
            Some(CapInfo {
                handle,
                region: capability.region,
                owner: region.owner,
                rights: capability.rights.bits(),
                len: region.byte_len(),
                mapped_at,
            })
        })
    }

    /// Takes `target`'s capability (or offer) for region `index` away and
    /// removes its mapping at once (the range stays reserved as revoked),
    /// then, transitively, everything derived from it. One event per
    /// participant, `target`'s first.
    fn revoke_participant<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        index: usize,
        target: u32,
        by: u32,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        // Depth-first over the derivation tree; at most SHM_PARTICIPANTS_MAX
        // entries are ever pending.
        let mut pending = alloc::vec![target];
        while let Some(pid) = pending.pop() {
            let region = &mut self.regions[index];
            let Some(position) = region.participants.iter().position(|p| p.pid == pid) else { continue };
            let participant = region.participants.remove(position);
            if self.shallow_revocation {
                events.push(self.take_away(memory, holders, index, participant, by));
                break;
            }
            pending.extend(region.participants.iter().filter(|p| p.granted_by == pid).map(|p| p.pid));
            events.push(self.take_away(memory, holders, index, participant, by));
        }
        events
    }

    /// Removes what participant `participant` (already out of region
    /// `index`'s list) held: its capability and its mapping.
    fn take_away<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        index: usize,
        participant: Participant,
        by: u32,
    ) -> Event {
        let region = &self.regions[index];
        let (id, owner, len) = (region.id, region.owner, region.byte_len());
        let target = participant.pid;
        let mut addr = 0;
        if let Some(holder) = holders.holder(target) {
            if participant.accepted {
                holder.caps.remove_region(id);
            }
            if participant.mapping.is_some() {
                addr = holder.space.revoke_shared(memory, id).unwrap_or(0);
                if target != owner {
                    holder.space.uncharge_shared(len);
                }
            }
        }
        Event::ShmRevoked { pid: by, region: id.into(), target: target.into(), addr }
    }

    /// Revokes region `index` from every participant (the owner last), then
    /// scrubs and frees its frames.
    fn destroy_region<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        index: usize,
        by: u32,
    ) -> Vec<Event> {
        let owner = self.regions[index].owner;
        let mut events = Vec::new();
        while let Some(other) = self.regions[index].participants.iter().position(|p| p.pid != owner) {
            let participant = self.regions[index].participants.remove(other);
            events.push(self.take_away(memory, holders, index, participant, by));
        }
        let region = self.regions.remove(index);
        if let Some(holder) = holders.holder(owner) {
            holder.caps.remove_region(region.id);
            holder.space.revoke_shared(memory, region.id);
            holder.space.uncharge_shared(region.byte_len());
        }
        let frames_freed = region.frames.len() as u64;
        memory.release_frames_later(region.frames);
        events.push(Event::ShmDestroyed { pid: by, region: region.id.into(), frames_freed });
        events
    }

    /// Before process `pid` goes away: destroys the regions it owns,
    /// revoking them from everyone.
    pub fn destroy_owned<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        pid: u32,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(index) = self.regions.iter().position(|r| r.owner == pid) {
            events.extend(self.destroy_region(memory, holders, index, pid));
        }
        events
    }

    /// Before process `pid` goes away (while it is still live and
    /// consistent): revokes, transitively, every capability and offer others
    /// derived from its, with `pid` as the revoker.
    pub fn revoke_derived<M: Memory, H: Holders>(
        &mut self,
        memory: &mut M,
        holders: &mut H,
        pid: u32,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        for index in 0..self.regions.len() {
            while let Some(derived) = self.regions[index]
                .participants
                .iter()
                .find(|p| p.granted_by == pid && p.pid != pid)
                .map(|p| p.pid)
            {
                events.extend(self.revoke_participant(memory, holders, index, derived, pid));
            }
        }
        events
    }

    /// After process `pid` is gone: drops it from every region (what was
    /// derived from its capabilities went before, [`Self::revoke_derived`]).
    pub fn forget(&mut self, pid: u32) {
        for region in &mut self.regions {
            region.participants.retain(|p| p.pid != pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address_space::tests::{kernel_setup, FakeMemory};
    use crate::address_space::Quotas;
    use crate::paging::{self, PageTableMemory};
    use proptest::prelude::*;
    use superos_protocol::syscall::{RIGHT_GRANT, RIGHT_READ, RIGHT_WRITE};
    use x86_64::structures::paging::PageTable;

    /// Three (or more) processes for the host tests.
    struct World {
        processes: Vec<(u32, AddressSpace, CapTable)>,
    }

    impl Holders for World {
        fn holder(&mut self, pid: u32) -> Option<Holder<'_>> {
            self.processes.iter_mut().find(|p| p.0 == pid).map(|(_, space, caps)| Holder { space, caps })
        }
    }

    fn world(memory: &mut FakeMemory, pids: &[u32], quotas: Quotas) -> World {
        let (kernel_pml4, gate) = kernel_setup(memory);
        World {
            processes: pids
                .iter()
                .map(|&pid| {
                    (
                        pid,
                        AddressSpace::new(memory, pid, kernel_pml4, gate, quotas).unwrap(),
                        CapTable::new(8, pid * 77),
                    )
                })
                .collect(),
        }
    }

    struct View<'a>(&'a mut FakeMemory);
    impl PageTableMemory for View<'_> {
        fn table(&mut self, frame: u64) -> &mut PageTable {
            self.0.table(frame)
        }
        fn alloc_table(&mut self) -> Option<u64> {
            None
        }
        fn free_table(&mut self, _: u64) {}
    }

    const RW: u64 = PROT_READ | PROT_WRITE;

    #[test]
    fn the_region_table_and_the_kernel_heap_bound_shm_create() {
        let mut memory = FakeMemory::new();
        let pids: Vec<u32> = (1..=(SHM_REGIONS_MAX / 8 + 1) as u32).collect();
        let mut world = world(&mut memory, &pids, Quotas::default());
        let mut shm = SharedMemory::default();
        // Eight capabilities each (the test tables' size), until the table is full.
        for &pid in &pids[..SHM_REGIONS_MAX / 8] {
            for _ in 0..8 {
                shm.create(&mut memory, &mut world, pid, 0x1000, RIGHT_READ).unwrap();
            }
        }
        assert_eq!(shm.regions().len(), SHM_REGIONS_MAX);
        let last = *pids.last().unwrap();
        let free = memory.allocator.free_frames();
        assert_eq!(
            shm.create(&mut memory, &mut world, last, 0x1000, RIGHT_READ).unwrap_err(),
            Refusal::Error(SysError::OutOfMemory)
        );
        // Refused before anything was taken: no frame, no charge, no capability.
        assert_eq!(memory.allocator.free_frames(), free);
        assert_eq!(world.holder(last).unwrap().space.stat().shared_bytes, 0);
        assert!(world.holder(last).unwrap().caps.is_empty());
        // A frame list the heap cannot spare is refused the same way.
        let handle = world.holder(1).unwrap().caps.iter().next().unwrap().0;
        shm.destroy(&mut memory, &mut world, 1, handle).unwrap();
        let free = memory.allocator.free_frames();
        memory.heap_room = 8 * 4 - 1;
        assert_eq!(
            shm.create(&mut memory, &mut world, last, 0x4000, RIGHT_READ).unwrap_err(),
            Refusal::Error(SysError::OutOfMemory)
        );
        assert_eq!(memory.allocator.free_frames(), free);
        memory.heap_room = 8 * 4;
        shm.create(&mut memory, &mut world, last, 0x4000, RIGHT_READ).unwrap();
    }

    #[test]
    fn all_live_regions_together_hold_at_most_shm_pages_max_pages() {
        let mut memory = FakeMemory::new();
        let mut world = world(&mut memory, &[1], Quotas::default());
        let mut shm = SharedMemory::default();
        // Pretend regions of another process hold all but 4 pages of the
        // limit (the fake RAM is smaller): only the frame lists count.
        let held = SHM_PAGES_MAX as usize - 4;
        let frames = vec![0; held];
        shm.regions.push(SharedRegion { id: 99, owner: 9, frames, participants: Vec::new() });
        let free = memory.allocator.free_frames();
        assert_eq!(
            shm.create(&mut memory, &mut world, 1, 5 * PAGE_SIZE, RIGHT_READ).unwrap_err(),
            Refusal::Error(SysError::OutOfMemory)
        );
        assert_eq!(memory.allocator.free_frames(), free);
        shm.create(&mut memory, &mut world, 1, 4 * PAGE_SIZE, RIGHT_READ).unwrap();
    }

    #[test]
    fn offers_are_charged_to_the_granter_and_take_nothing_until_accepted() {
        let mut memory = FakeMemory::new();
        let mut world = world(&mut memory, &[1, 2, 3], Quotas::default());
        for (_, _, caps) in &mut world.processes {
            *caps = CapTable::new(CAPS_MAX, 5);
        }
        let mut shm = SharedMemory::default();
        let mut refusal = None;
        let mut offered = Vec::new();
        for _ in 0..=OFFERS_PER_GRANTER {
            let (handle, _) =
                shm.create(&mut memory, &mut world, 1, 0x1000, RIGHT_READ | RIGHT_GRANT).unwrap();
            match shm.grant(&mut world, 1, handle, 2, RIGHT_READ) {
                Ok(_) => offered.push(handle),
                Err(error) => refusal = Some(error),
            }
        }
        assert_eq!(
            refusal,
            Some(Refusal::Quota {
                kind: QuotaKind::Capabilities,
                requested: OFFERS_PER_GRANTER as u64 + 1,
                limit: OFFERS_PER_GRANTER as u64,
            })
        );
        // The receiver's table is untouched by offers.
        assert!(world.holder(2).unwrap().caps.is_empty());
        // Another granter still gets through, and its offer is accepted.
        let (other, _) = shm.create(&mut memory, &mut world, 3, 0x1000, RIGHT_READ | RIGHT_GRANT).unwrap();
        shm.grant(&mut world, 3, other, 2, RIGHT_READ).unwrap();
        let region = shm.cap_infos(3, world.holder(3).unwrap().caps).next().unwrap().region;
        let (theirs, events) = shm.accept(&mut world, 2, region.into()).unwrap();
        assert_eq!(events, vec![Event::ShmAccepted { pid: 2, region: region.into(), granter: 3, rights: 1 }]);
        assert_eq!(world.holder(2).unwrap().caps.len(), 1);
        // Accepting twice, or what was never offered, is a bad handle.
        assert_eq!(
            shm.accept(&mut world, 2, region.into()).unwrap_err(),
            Refusal::Error(SysError::BadHandle)
        );
        assert_eq!(shm.accept(&mut world, 3, 999).unwrap_err(), Refusal::Error(SysError::BadHandle));
        // The holder drops a mapped capability: its mapping is revoked, the
        // handle stale; an owner cannot drop its own.
        let (at, _) = shm.map(&mut memory, &mut world, 2, theirs, PROT_READ).unwrap();
        let events = shm.drop_capability(&mut memory, &mut world, 2, theirs).unwrap();
        assert_eq!(events, vec![Event::ShmRevoked { pid: 2, region: region.into(), target: 2, addr: at }]);
        assert_eq!(shm.drop_capability(&mut memory, &mut world, 2, theirs), Err(SysError::BadHandle));
        assert_eq!(shm.drop_capability(&mut memory, &mut world, 3, other), Err(SysError::NotPermitted));
        // The granter withdraws an offer, which frees its share for a new one.
        shm.revoke(&mut memory, &mut world, 1, offered[0], 2).unwrap();
        let (again, _) = shm.create(&mut memory, &mut world, 1, 0x1000, RIGHT_READ | RIGHT_GRANT).unwrap();
        assert!(shm.grant(&mut world, 1, again, 2, RIGHT_READ).is_ok());
        // An accepted offer no longer counts as outstanding.
        let first = offered[1];
        let region =
            shm.cap_infos(1, world.holder(1).unwrap().caps).find(|i| i.handle == first).unwrap().region;
        shm.accept(&mut world, 2, region.into()).unwrap();
        let (more, _) = shm.create(&mut memory, &mut world, 1, 0x1000, RIGHT_READ | RIGHT_GRANT).unwrap();
        assert!(shm.grant(&mut world, 1, more, 3, RIGHT_READ).is_ok());
    }

    #[test]
    fn revocation_takes_everything_derived_from_the_revoked_capability() {
        let mut memory = FakeMemory::new();
        let mut world = world(&mut memory, &[1, 2, 3, 4], Quotas::default());
        let mut shm = SharedMemory::default();
        let all = RIGHT_READ | RIGHT_WRITE | RIGHT_GRANT;
        let (owner, _) = shm.create(&mut memory, &mut world, 1, 0x1000, all).unwrap();
        // 1 -> 2 -> 3 (mapped), 2 -> 4 (offered only).
        shm.grant(&mut world, 1, owner, 2, all).unwrap();
        let (b, _) = shm.accept(&mut world, 2, 1).unwrap();
        shm.grant(&mut world, 2, b, 3, RIGHT_READ | RIGHT_WRITE).unwrap();
        let (c, _) = shm.accept(&mut world, 3, 1).unwrap();
        let (at, _) = shm.map(&mut memory, &mut world, 3, c, RW).unwrap();
        shm.grant(&mut world, 2, b, 4, RIGHT_READ).unwrap();
        // Only the owner or the direct granter may revoke.
        assert_eq!(shm.revoke(&mut memory, &mut world, 3, c, 4), Err(SysError::NotPermitted));
        let events = shm.revoke(&mut memory, &mut world, 1, owner, 2).unwrap();
        let targets: Vec<u64> = events
            .iter()
            .map(|e| match e {
                Event::ShmRevoked { pid: 1, target, .. } => *target,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(targets.len(), 3);
        assert_eq!(targets[0], 2);
        assert!(targets.contains(&3) && targets.contains(&4));
        assert!(events.contains(&Event::ShmRevoked { pid: 1, region: 1, target: 3, addr: at }));
        assert!(world.holder(3).unwrap().caps.is_empty());
        assert_eq!(shm.accept(&mut world, 4, 1).unwrap_err(), Refusal::Error(SysError::BadHandle));
        assert_eq!(shm.regions()[0].participants.len(), 1);
        // A granter's exit takes what it derived, too.
        shm.grant(&mut world, 1, owner, 2, all).unwrap();
        let (b, _) = shm.accept(&mut world, 2, 1).unwrap();
        shm.grant(&mut world, 2, b, 3, RIGHT_READ).unwrap();
        shm.accept(&mut world, 3, 1).unwrap();
        let events = shm.revoke_derived(&mut memory, &mut world, 2);
        assert_eq!(events, vec![Event::ShmRevoked { pid: 2, region: 1, target: 3, addr: 0 }]);
        let index = world.processes.iter().position(|p| p.0 == 2).unwrap();
        let (_, space, _) = world.processes.remove(index);
        space.destroy(&mut memory);
        shm.forget(2);
        assert!(world.holder(3).unwrap().caps.is_empty());
        // DEBUG_SHALLOW_REVOCATION: the bug the checker must catch.
        shm.shallow_revocation = true;
        shm.grant(&mut world, 1, owner, 3, all).unwrap();
        let (c, _) = shm.accept(&mut world, 3, 1).unwrap();
        shm.grant(&mut world, 3, c, 4, RIGHT_READ).unwrap();
        shm.accept(&mut world, 4, 1).unwrap();
        assert_eq!(shm.revoke(&mut memory, &mut world, 1, owner, 3).unwrap().len(), 1);
        assert_eq!(world.holder(4).unwrap().caps.len(), 1);
    }

    /// A sliced `shm_create`: frames come a bounded number per slice, the
    /// build counts against the page limit, and an abandoned build frees
    /// every frame it had.
    #[test]
    fn a_create_in_slices_allocates_a_bounded_number_of_frames_per_slice() {
        let mut memory = FakeMemory::new();
        let mut world = world(&mut memory, &[1], Quotas::default());
        let mut shm = SharedMemory::default();
        let free = memory.allocator.free_frames();
        let mut build = shm.create_begin(&mut memory, &mut world, 1, 40 * PAGE_SIZE, RIGHT_READ).unwrap();
        let mut slices = 1;
        while !shm.create_step(&mut memory, &mut build, 8 * 17).unwrap() {
            assert_eq!(build.frames.len(), 8 * slices);
            slices += 1;
        }
        assert_eq!(slices, 5);
        assert!(build.frames.iter().all(|&f| memory.owner(f) == Some(FrameOwner::Shared(build.id))));
        assert_eq!(world.holder(1).unwrap().space.stat().shared_bytes, 0, "charged only when live");
        assert!(shm.regions().is_empty());
        // The build's pages count: the limit refuses what would exceed it.
        assert!(!shm.room_for(SHM_PAGES_MAX - 39));
        shm.create_abort(&mut memory, build);
        assert_eq!(memory.allocator.free_frames(), free);
        assert!(shm.room_for(SHM_PAGES_MAX));
        // A finished build is a live region, charged, with its capability.
        let mut build = shm.create_begin(&mut memory, &mut world, 1, 3 * PAGE_SIZE, RIGHT_READ).unwrap();
        while !shm.create_step(&mut memory, &mut build, 17).unwrap() {}
        let (handle, events) = shm.create_finish(&mut memory, &mut world, 1, build).unwrap();
        assert_eq!(
            events,
            vec![Event::ShmCreated { pid: 1, region: 2, len: 3 * PAGE_SIZE, rights: RIGHT_READ }]
        );
        assert_eq!(world.holder(1).unwrap().space.stat().shared_bytes, 3 * PAGE_SIZE);
        assert!(world.holder(1).unwrap().caps.get(handle).is_some());
    }

    /// A sliced `shm_map`: the participant is mapped (with some pages) from
    /// the first slice on; a revocation between slices makes the next slice
    /// `bad-handle` and leaves a revoked range, with nothing charged.
    #[test]
    fn a_map_in_slices_is_consistent_between_slices_and_ends_with_a_revocation() {
        let mut memory = FakeMemory::new();
        let mut world = world(&mut memory, &[1, 2], Quotas::default());
        let mut shm = SharedMemory::default();
        let (owner, _) =
            shm.create(&mut memory, &mut world, 1, 64 * PAGE_SIZE, RIGHT_READ | RIGHT_GRANT).unwrap();
        shm.grant(&mut world, 1, owner, 2, RIGHT_READ).unwrap();
        let (theirs, _) = shm.accept(&mut world, 2, 1).unwrap();
        let at = shm.map_begin(&mut memory, &mut world, 2, theirs, PROT_READ).unwrap();
        assert_eq!(shm.regions()[0].participants[1].mapping, Some((at, PROT_READ)));
        let budget = 8 * 17;
        let mut from = 0;
        let mut slices = 0;
        let event = loop {
            match shm.map_continue(&mut memory, &mut world, 2, at, from, budget).unwrap() {
                MapProgress::More(next) => {
                    assert_eq!(next, from + 8);
                    from = next;
                    slices += 1;
                }
                MapProgress::Done(event) => break event,
            }
        };
        assert_eq!(slices, 7);
        assert_eq!(event, Event::ShmMapped { pid: 2, region: 1, addr: at, prot: PROT_READ });
        assert_eq!(world.holder(2).unwrap().space.stat().shared_bytes, 64 * PAGE_SIZE);
        // Unmapped in slices: still a mapped participant until the last.
        let mut from = at;
        let events = loop {
            match shm.unmap_slice(&mut memory, &mut world, 2, at, from, budget).unwrap() {
                UnmapProgress::More(next) => {
                    assert!(next > from);
                    assert_eq!(shm.regions()[0].participants[1].mapping, Some((at, PROT_READ)));
                    from = next;
                }
                UnmapProgress::Done(events) => break events,
            }
        };
        assert_eq!(events, vec![Event::ShmUnmapped { pid: 2, region: 1, addr: at }]);
        assert_eq!(shm.regions()[0].participants[1].mapping, None);
        assert_eq!(world.holder(2).unwrap().space.stat().shared_bytes, 0);
        // Revoked after its first slice: the next one is refused.
        let at = shm.map_begin(&mut memory, &mut world, 2, theirs, PROT_READ).unwrap();
        assert!(matches!(
            shm.map_continue(&mut memory, &mut world, 2, at, 0, budget),
            Ok(MapProgress::More(8))
        ));
        shm.revoke(&mut memory, &mut world, 1, owner, 2).unwrap();
        assert_eq!(
            shm.map_continue(&mut memory, &mut world, 2, at, 8, budget),
            Err(Refusal::Error(SysError::BadHandle))
        );
        assert_eq!(world.holder(2).unwrap().space.stat().shared_bytes, 0);
        assert_eq!(world.holder(2).unwrap().space.revoked_ranges(), 1);
    }

    #[test]
    fn the_whole_flow_step_by_step() {
        let mut memory = FakeMemory::new();
        let mut world = world(&mut memory, &[1, 2], Quotas::default());
        let mut shm = SharedMemory::default();
        let (handle, _) =
            shm.create(&mut memory, &mut world, 1, 0x2000, RIGHT_READ | RIGHT_WRITE | RIGHT_GRANT).unwrap();
        // A grant is an offer that maps nothing; accepted, the grantee's
        // handle is its own.
        shm.grant(&mut world, 1, handle, 2, RIGHT_READ).unwrap();
        assert_eq!(shm.cap_infos(2, world.holder(2).unwrap().caps).count(), 0);
        shm.accept(&mut world, 2, 1).unwrap();
        let infos: Vec<_> = shm.cap_infos(2, world.holder(2).unwrap().caps).collect();
        assert_eq!(infos.len(), 1);
        assert_eq!((infos[0].region, infos[0].mapped_at, infos[0].rights), (1, 0, RIGHT_READ));
        let theirs = infos[0].handle;
        assert_ne!(theirs, handle);
        assert_eq!(
            shm.map(&mut memory, &mut world, 2, handle, PROT_READ).unwrap_err(),
            Refusal::Error(SysError::BadHandle)
        );
        assert_eq!(
            shm.map(&mut memory, &mut world, 2, theirs, RW).unwrap_err(),
            Refusal::Error(SysError::NotPermitted)
        );
        let (at, _) = shm.map(&mut memory, &mut world, 2, theirs, PROT_READ).unwrap();
        assert_eq!(
            shm.map(&mut memory, &mut world, 2, theirs, PROT_READ).unwrap_err(),
            Refusal::Error(SysError::AlreadyMapped)
        );
        assert_eq!(
            shm.grant(&mut world, 2, theirs, 1, RIGHT_READ),
            Err(Refusal::Error(SysError::NotPermitted)),
            "no GRANT right"
        );
        assert_eq!(
            shm.revoke(&mut memory, &mut world, 2, theirs, 1),
            Err(SysError::NotPermitted),
            "neither the owner nor the granter"
        );
        let events = shm.revoke(&mut memory, &mut world, 1, handle, 2).unwrap();
        assert_eq!(events, vec![Event::ShmRevoked { pid: 1, region: 1, target: 2, addr: at }]);
        assert!(world.holder(2).unwrap().caps.get(theirs).is_none());
        let frames = shm.regions()[0].frames.clone();
        assert!(frames.iter().all(|&f| memory.owner(f) == Some(FrameOwner::Shared(1))));
        let events = shm.destroy(&mut memory, &mut world, 1, handle).unwrap();
        assert_eq!(events, vec![Event::ShmDestroyed { pid: 1, region: 1, frames_freed: 2 }]);
        assert!(frames.iter().all(|&f| memory.owner(f) == Some(FrameOwner::Free)));
        assert!(shm.regions().is_empty());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Create(u32, u8, u8),
        Grant(u32, u8, u32, u8),
        Accept(u32, u8),
        Drop(u32, u8),
        Map(u32, u8, bool),
        Unmap(u32, u8),
        Revoke(u32, u8, u32),
        Destroy(u32, u8),
        Exit(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        let pid = 1u32..5;
        prop_oneof![
            (pid.clone(), 1u8..4, 1u8..8).prop_map(|(p, n, r)| Op::Create(p, n, r)),
            (pid.clone(), any::<u8>(), 1u32..5, 1u8..8).prop_map(|(p, h, t, r)| Op::Grant(p, h, t, r)),
            (pid.clone(), 1u8..6).prop_map(|(p, r)| Op::Accept(p, r)),
            (pid.clone(), any::<u8>()).prop_map(|(p, h)| Op::Drop(p, h)),
            (pid.clone(), any::<u8>(), any::<bool>()).prop_map(|(p, h, w)| Op::Map(p, h, w)),
            (pid.clone(), any::<u8>()).prop_map(|(p, m)| Op::Unmap(p, m)),
            (pid.clone(), any::<u8>(), 1u32..5).prop_map(|(p, h, t)| Op::Revoke(p, h, t)),
            (pid.clone(), any::<u8>()).prop_map(|(p, h)| Op::Destroy(p, h)),
            pid.prop_map(Op::Exit),
        ]
    }

    /// A handle the process holds, chosen by `pick` (or a forged one).
    fn some_handle(world: &mut World, pid: u32, pick: u8) -> u64 {
        let Some(holder) = world.holder(pid) else { return 0 };
        let handles: Vec<u64> = holder.caps.iter().map(|(h, _)| h).collect();
        if handles.is_empty() || pick % 8 == 7 {
            return u64::from(pick) << 32 | 1;
        }
        handles[pick as usize % handles.len()]
    }

    proptest! {
        /// Random create/grant/map/unmap/revoke/destroy/exit sequences keep
        /// capability tables, participants, page tables and frame owners in
        /// agreement, and leak nothing.
        #[test]
        fn random_sequences_keep_the_tables_consistent(ops in prop::collection::vec(op(), 1..80)) {
            let mut memory = FakeMemory::new();
            let baseline = memory.allocator.free_frames();
            let mut world = world(&mut memory, &[1, 2, 3, 4], Quotas { max_shared: 6 * 4096, ..Quotas::default() });
            let mut shm = SharedMemory::default();
            for op in ops {
                match op {
                    Op::Create(pid, pages, rights) if world.holder(pid).is_some() => {
                        let _ = shm.create(&mut memory, &mut world, pid, u64::from(pages) * 4096, u64::from(rights));
                    }
                    Op::Grant(pid, pick, target, rights) if world.holder(pid).is_some() => {
                        let handle = some_handle(&mut world, pid, pick);
                        let _ = shm.grant(&mut world, pid, handle, u64::from(target), u64::from(rights));
                    }
                    Op::Accept(pid, region) if world.holder(pid).is_some() => {
                        let _ = shm.accept(&mut world, pid, u64::from(region));
                    }
                    Op::Drop(pid, pick) if world.holder(pid).is_some() => {
                        let handle = some_handle(&mut world, pid, pick);
                        let _ = shm.drop_capability(&mut memory, &mut world, pid, handle);
                    }
                    Op::Map(pid, pick, write) if world.holder(pid).is_some() => {
                        let handle = some_handle(&mut world, pid, pick);
                        let _ = shm.map(&mut memory, &mut world, pid, handle, if write { RW } else { PROT_READ });
                    }
                    Op::Unmap(pid, pick) => {
                        let mapped: Vec<u64> = shm.regions().iter()
                            .flat_map(|r| r.participants.iter().filter(|p| p.pid == pid).filter_map(|p| p.mapping))
                            .map(|(addr, _)| addr).collect();
                        if let Some(&addr) = mapped.get(pick as usize % mapped.len().max(1)) {
                            prop_assert!(shm.unmap(&mut memory, &mut world, pid, addr).is_ok());
                        }
                    }
                    Op::Revoke(pid, pick, target) if world.holder(pid).is_some() => {
                        let handle = some_handle(&mut world, pid, pick);
                        let _ = shm.revoke(&mut memory, &mut world, pid, handle, u64::from(target));
                    }
                    Op::Destroy(pid, pick) if world.holder(pid).is_some() => {
                        let handle = some_handle(&mut world, pid, pick);
                        let _ = shm.destroy(&mut memory, &mut world, pid, handle);
                    }
                    Op::Exit(pid) if world.holder(pid).is_some() => {
                        shm.destroy_owned(&mut memory, &mut world, pid);
                        shm.revoke_derived(&mut memory, &mut world, pid);
                        let index = world.processes.iter().position(|p| p.0 == pid).unwrap();
                        let (_, space, _) = world.processes.remove(index);
                        space.destroy(&mut memory);
                        shm.forget(pid);
                    }
                    _ => {}
                }
                // Capabilities and participants agree, both ways.
                for (pid, _, caps) in &world.processes {
                    for (_, capability) in caps.iter() {
                        let region = shm.regions().iter().find(|r| r.id == capability.region);
                        prop_assert!(region.is_some(), "pid {} holds a capability for a dead region", pid);
                        let participant = region.unwrap().participants.iter().find(|p| p.pid == *pid);
                        prop_assert_eq!(participant.map(|p| (p.rights, p.accepted)), Some((capability.rights, true)));
                    }
                }
                for region in shm.regions() {
                    prop_assert!(world.processes.iter().any(|p| p.0 == region.owner), "orphaned region");
                    for participant in &region.participants {
                        let (_, space, caps) = world.processes.iter().find(|p| p.0 == participant.pid).unwrap();
                        prop_assert_eq!(caps.find_region(region.id).is_some(), participant.accepted);
                        prop_assert!(participant.accepted || participant.mapping.is_none());
                        // The derivation chain runs through holders to the owner.
                        let mut at = *participant;
                        for _ in 0..=SHM_PARTICIPANTS_MAX {
                            if at.pid == region.owner {
                                break;
                            }
                            let granter = region.participants.iter().find(|p| p.pid == at.granted_by && p.accepted);
                            prop_assert!(granter.is_some(), "pid {} derived from pid {}, which holds nothing", at.pid, at.granted_by);
                            at = *granter.unwrap();
                        }
                        prop_assert_eq!(at.pid, region.owner, "a derivation cycle");
                        // A mapping exists exactly when the page tables map the frames.
                        let first = region.frames[0];
                        match participant.mapping {
                            Some((addr, prot)) => {
                                let t = paging::translate(&mut View(&mut memory), space.pml4(), addr).unwrap();
                                prop_assert_eq!(t.phys, first);
                                prop_assert!(t.flags.contains(x86_64::structures::paging::PageTableFlags::NO_EXECUTE));
                                prop_assert!(prot & PROT_WRITE != 0 || !t.flags.contains(x86_64::structures::paging::PageTableFlags::WRITABLE));
                            }
                            None => {
                                let mapped_anywhere = space.regions().iter().any(|r| matches!(r.kind,
                                    crate::fault::RegionKind::Shared { region: id, .. } if id == region.id));
                                prop_assert!(!mapped_anywhere);
                            }
                        }
                    }
                    for &frame in &region.frames {
                        prop_assert_eq!(memory.owner(frame), Some(FrameOwner::Shared(region.id)));
                    }
                }
            }
            // Everyone exits: nothing may remain.
            let pids: Vec<u32> = world.processes.iter().map(|p| p.0).collect();
            for pid in pids {
                shm.destroy_owned(&mut memory, &mut world, pid);
                shm.revoke_derived(&mut memory, &mut world, pid);
                let index = world.processes.iter().position(|p| p.0 == pid).unwrap();
                let (_, space, _) = world.processes.remove(index);
                space.destroy(&mut memory);
                shm.forget(pid);
            }
            prop_assert!(shm.regions().is_empty());
            // The kernel PML4 and the gate frame are the only frames left.
            prop_assert_eq!(memory.allocator.free_frames(), baseline - 2, "frames leaked");
        }
    }
}
