//! Kernel event records and the ring the VMM drains.
//!
//! The kernel appends fixed-size [`EventRecord`]s to a single-producer,
//! single-consumer ring in its own memory and tells the VMM with
//! [`crate::hypercall::Hypercall::EventNotify`]. `head` counts records ever
//! written (kernel-owned), `tail` records ever consumed (VMM-owned); the slot of
//! record `n` is `n % capacity`. When the ring is full the kernel drops the new
//! record and increments `lost`, so nothing disappears silently.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `EventRingHeader::magic`: "EVNT".
pub const EVENT_RING_MAGIC: u32 = u32::from_le_bytes(*b"EVNT");

/// Header of the event ring; `capacity` records follow it directly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct EventRingHeader {
    /// [`EVENT_RING_MAGIC`].
    pub magic: u32,
    /// [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// Number of record slots.
    pub capacity: u32,
    /// `size_of::<EventRecord>()`, checked by the reader.
    pub record_size: u32,
    /// Records written so far (kernel-written).
    pub head: u64,
    /// Records consumed so far (VMM-written).
    pub tail: u64,
    /// Records dropped because the ring was full (kernel-written).
    pub lost: u64,
    /// Always zero.
    pub reserved: u64,
}

/// One event as stored in the ring. The meaning of `args` depends on `kind`; use
/// [`EventRecord::decode`] rather than reading them directly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct EventRecord {
    /// Sequence number, starting at 0, one per record written.
    pub seq: u64,
    /// Timer ticks since boot when the event happened.
    pub tick: u64,
    /// [`EventKind`] as a raw value.
    pub kind: u16,
    /// The CPU that logged it.
    pub cpu: u16,
    /// The process concerned (0 for the kernel itself).
    pub pid: u32,
    /// Kind-specific arguments.
    pub args: [u64; 5],
}

const _: () = {
    assert!(core::mem::size_of::<EventRingHeader>() == 48);
    assert!(core::mem::size_of::<EventRecord>() == 64);
};

/// Event kinds (the `kind` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum EventKind {
    /// The kernel finished booting. args: [gate kind, free frames, total frames].
    KernelReady = 1,
    /// A gate failed its boot self-test. args: [gate kind, vector, rip, error code].
    GateSelfTestFailed = 2,
    /// A process was created. args: [boot spec index, PML4 frame GPA].
    ProcessSpawned = 3,
    /// A process could not be created. args: [boot spec index, [`SpawnError`]].
    SpawnFailed = 4,
    /// A process exited by itself. args: [exit code (as i64), times preempted].
    ProcessExited = 5,
    /// A process was terminated by the kernel. args: [[`FaultKind`], address,
    /// rip, error code, vector].
    ProcessKilled = 6,
    /// A malformed hypercall was refused as expected (debug self-check).
    /// args: [hypercall port, status the VMM returned].
    HypercallRefused = 7,
    /// `mem_map` succeeded. args: [address, length, prot].
    MemMapped = 8,
    /// `mem_unmap` succeeded. args: [address, length, resident pages freed].
    MemUnmapped = 9,
    /// `mem_protect` succeeded. args: [address, length, new prot].
    MemProtected = 10,
    /// A request was refused because of a quota. args: [[`QuotaKind`],
    /// total requested, limit], in the quota's [`QuotaKind::unit`].
    QuotaDenied = 11,
    /// A process crossed 90% of a quota. args: [[`QuotaKind`], bytes used, limit].
    QuotaPressure = 12,
    /// The free-frame pool fell below 10% of guest memory. args: [free
    /// frames, total frames].
    FramePoolLow = 13,
    /// The kernel is shutting down. args: [free frames, total frames,
    /// processes created].
    KernelShutdown = 14,
    /// A shared region was created. args: [region id, length, rights].
    ShmCreated = 15,
    /// A capability was offered (`shm_grant`; the grantee holds it once it
    /// accepts). args: [region id, grantee pid, rights].
    ShmGranted = 16,
    /// A participant mapped a region. args: [region id, address, prot].
    ShmMapped = 17,
    /// A participant unmapped a region. args: [region id, address].
    ShmUnmapped = 18,
    /// A capability was revoked and its mapping removed. args: [region id,
    /// the pid that lost it, address it was mapped at (0 if not mapped)].
    ShmRevoked = 19,
    /// A region was destroyed. args: [region id, frames freed].
    ShmDestroyed = 20,
    /// An offered capability was accepted (`shm_accept`). args: [region id,
    /// the granter's pid, rights].
    ShmAccepted = 21,
}

impl EventKind {
    /// Decodes a raw kind.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            1 => Self::KernelReady,
            2 => Self::GateSelfTestFailed,
            3 => Self::ProcessSpawned,
            4 => Self::SpawnFailed,
            5 => Self::ProcessExited,
            6 => Self::ProcessKilled,
            7 => Self::HypercallRefused,
            8 => Self::MemMapped,
            9 => Self::MemUnmapped,
            10 => Self::MemProtected,
            11 => Self::QuotaDenied,
            12 => Self::QuotaPressure,
            13 => Self::FramePoolLow,
            14 => Self::KernelShutdown,
            15 => Self::ShmCreated,
            16 => Self::ShmGranted,
            17 => Self::ShmMapped,
            18 => Self::ShmUnmapped,
            19 => Self::ShmRevoked,
            20 => Self::ShmDestroyed,
            21 => Self::ShmAccepted,
            _ => return None,
        })
    }
}

macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)*
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// Decodes a raw value.
            pub fn from_raw(raw: u32) -> Option<Self> {
                match raw {
                    $($value => Some(Self::$variant),)*
                    _ => None,
                }
            }

            /// The stable kebab-case name used in logs, scenario files and tests.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)*
                }
            }

            /// Looks a variant up by its [`Self::name`].
            pub fn from_name(name: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.name() == name)
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

named_enum! {
    /// Why the kernel terminated a process.
    FaultKind {
        /// Access to an address the process does not map.
        UnmappedAccess = 1 => "unmapped-access",
        /// Access to the unmapped guard page below the stack.
        StackGuard = 2 => "stack-guard",
        /// Write to a code page (including the gate page).
        WriteToCode = 3 => "write-to-code",
        /// Write to a read-only data page.
        WriteToReadOnly = 4 => "write-to-read-only",
        /// Instruction fetch from a non-executable page.
        ExecuteNonExecutable = 5 => "execute-non-executable",
        /// Access to a kernel address or a supervisor-only page.
        KernelAccess = 6 => "kernel-access",
        /// General-protection fault (privileged instruction, non-canonical address).
        GeneralProtection = 7 => "general-protection",
        /// Invalid or undefined opcode.
        InvalidOpcode = 8 => "invalid-opcode",
        /// Divide error.
        DivideError = 9 => "divide-error",
        /// A system-call entry that did not come through the gate stub.
        IllegalGateEntry = 10 => "illegal-gate-entry",
        /// A CPU exception raised in ring 3 with no name of its own (a vector
        /// the architecture reserves or this kernel never enables).
        OtherException = 11 => "other-exception",
        /// A demand-zero page would exceed the resident-set quota.
        ResidentQuotaExceeded = 12 => "resident-quota-exceeded",
        /// A mapping would exceed the virtual quota (policy `kill`).
        VirtualQuotaExceeded = 13 => "virtual-quota-exceeded",
        /// Shared memory would exceed the shared quota (policy `kill`).
        SharedQuotaExceeded = 14 => "shared-quota-exceeded",
        /// The guest ran out of physical memory while serving the process.
        OutOfMemory = 15 => "out-of-memory",
        /// Access to a shared region after its capability was revoked.
        UseAfterRevoke = 16 => "use-after-revoke",
        /// Blocked in a receive that no live process can ever satisfy.
        Deadlock = 17 => "deadlock",
        /// A call would need more map entries than
        /// [`crate::syscall::MAPPINGS_MAX`] (policy `kill`).
        MappingQuotaExceeded = 18 => "mapping-quota-exceeded",
        /// Debug exception (#DB): single-stepping with RFLAGS.TF, or `int1`.
        DebugException = 19 => "debug-exception",
        /// x87 floating-point error (#MF): a pending unmasked x87 exception,
        /// delivered at the process's next x87 instruction; the address is
        /// the x87 instruction that caused it.
        X87FloatingPoint = 20 => "x87-floating-point",
        /// SIMD floating-point exception (#XM): an unmasked MXCSR exception.
        SimdFloatingPoint = 21 => "simd-floating-point",
        /// Alignment check (#AC): a misaligned access with RFLAGS.AC set.
        AlignmentCheck = 22 => "alignment-check",
        /// Device not available (#NM).
        DeviceNotAvailable = 23 => "device-not-available",
        /// Segment not present (#NP).
        SegmentNotPresent = 24 => "segment-not-present",
        /// Stack-segment fault (#SS): e.g. a non-canonical stack address.
        StackSegmentFault = 25 => "stack-segment-fault",
        /// Invalid TSS (#TS).
        InvalidTss = 26 => "invalid-tss",
        /// Machine check (#MC) while the process ran.
        MachineCheck = 27 => "machine-check",
        /// Overflow (#OF).
        Overflow = 28 => "overflow",
        /// Bound range exceeded (#BR).
        BoundRangeExceeded = 29 => "bound-range-exceeded",
        /// Control-protection exception (#CP).
        ControlProtection = 30 => "control-protection",
        /// A call would need a capability slot beyond
        /// [`crate::syscall::CAPS_MAX`] or a region participant beyond
        /// [`crate::syscall::SHM_PARTICIPANTS_MAX`] (policy `kill`).
        CapabilityQuotaExceeded = 31 => "capability-quota-exceeded",
    }
}

named_enum! {
    /// Which quota an event is about.
    QuotaKind {
        /// Virtual size.
        Virtual = 1 => "virtual",
        /// Resident set size.
        Resident = 2 => "resident",
        /// Shared memory.
        Shared = 3 => "shared",
        /// Entries in the process's map ([`crate::syscall::MAPPINGS_MAX`]);
        /// counted in entries, not bytes.
        Mappings = 4 => "mappings",
        /// Capability slots ([`crate::syscall::CAPS_MAX`] per table) and
        /// region participants ([`crate::syscall::SHM_PARTICIPANTS_MAX`]);
        /// counted in entries.
        Capabilities = 5 => "capabilities",
    }
}

impl QuotaKind {
    /// What the quota counts: `bytes`, or `entries` for [`QuotaKind::Mappings`].
    pub const fn unit(self) -> &'static str {
        match self {
            QuotaKind::Mappings | QuotaKind::Capabilities => "entries",
            _ => "bytes",
        }
    }

    /// The fault that terminates a process exceeding this quota under policy
    /// `kill`.
    pub const fn fault(self) -> FaultKind {
        match self {
            QuotaKind::Virtual => FaultKind::VirtualQuotaExceeded,
            QuotaKind::Resident => FaultKind::ResidentQuotaExceeded,
            QuotaKind::Shared => FaultKind::SharedQuotaExceeded,
            QuotaKind::Mappings => FaultKind::MappingQuotaExceeded,
            QuotaKind::Capabilities => FaultKind::CapabilityQuotaExceeded,
        }
    }
}

/// The unit of an optional quota kind in event text.
fn quota_unit(quota: Option<QuotaKind>) -> &'static str {
    quota.map_or("bytes", QuotaKind::unit)
}

named_enum! {
    /// Why a boot process could not be created.
    SpawnError {
        /// The program index names no program image.
        NoSuchProgram = 1 => "no-such-program",
        /// The ELF image is malformed or not an x86-64 executable.
        BadElf = 2 => "bad-elf",
        /// A segment lies outside the user image window or overlaps another.
        BadSegmentAddress = 3 => "bad-segment-address",
        /// A segment asks to be both writable and executable (W^X).
        WritableAndExecutable = 4 => "writable-and-executable",
        /// The entry point is not inside an executable segment.
        BadEntryPoint = 5 => "bad-entry-point",
        /// Out of physical memory.
        OutOfMemory = 6 => "out-of-memory",
        /// The process table is full.
        TooManyProcesses = 7 => "too-many-processes",
        /// The image needs more virtual memory than the process's quota.
        QuotaExceeded = 8 => "quota-exceeded",
    }
}

/// A decoded event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// See [`EventKind::KernelReady`].
    KernelReady {
        /// `GATE_KIND_*` in use.
        gate_kind: u32,
        /// Free frames after boot.
        free_frames: u64,
        /// Frames of guest RAM managed by the allocator.
        total_frames: u64,
        /// CPUs online (the bootstrap CPU and every application processor
        /// the kernel started).
        cpus: u32,
    },
    /// See [`EventKind::GateSelfTestFailed`].
    GateSelfTestFailed {
        /// The gate that failed.
        gate_kind: u32,
        /// The exception it raised instead of a system call.
        vector: u64,
        /// Where.
        rip: u64,
        /// The exception's error code.
        error_code: u64,
    },
    /// See [`EventKind::ProcessSpawned`].
    ProcessSpawned {
        /// The new process.
        pid: u32,
        /// Its index in the boot process list.
        spec_index: u64,
        /// GPA of its PML4.
        pml4_gpa: u64,
    },
    /// See [`EventKind::SpawnFailed`].
    SpawnFailed {
        /// Index in the boot process list.
        spec_index: u64,
        /// Why (`None` if the kernel sent an unknown code).
        error: Option<SpawnError>,
    },
    /// See [`EventKind::ProcessExited`].
    ProcessExited {
        /// The process.
        pid: u32,
        /// Its exit code.
        code: i64,
        /// How often the timer preempted it.
        preemptions: u64,
    },
    /// See [`EventKind::ProcessKilled`].
    ProcessKilled {
        /// The process.
        pid: u32,
        /// Why (`None` if the kernel sent an unknown code).
        fault: Option<FaultKind>,
        /// Faulting address: CR2 for page faults, the x87 instruction for
        /// #MF, the faulting instruction for other exceptions, 0 for kills
        /// that are not exceptions.
        addr: u64,
        /// Faulting instruction.
        rip: u64,
        /// Exception error code.
        error_code: u64,
        /// Exception vector.
        vector: u64,
    },
    /// See [`EventKind::HypercallRefused`].
    HypercallRefused {
        /// The port of the refused call.
        port: u64,
        /// The status the VMM answered.
        status: u64,
    },
    /// See [`EventKind::MemMapped`].
    MemMapped {
        /// The process.
        pid: u32,
        /// Start of the mapping.
        addr: u64,
        /// Length in bytes (whole pages).
        len: u64,
        /// `PROT_*` bits.
        prot: u64,
    },
    /// See [`EventKind::MemUnmapped`].
    MemUnmapped {
        /// The process.
        pid: u32,
        /// Start of the range.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// Resident pages released (scrubbed and freed).
        freed_pages: u64,
    },
    /// See [`EventKind::MemProtected`].
    MemProtected {
        /// The process.
        pid: u32,
        /// Start of the range.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// New `PROT_*` bits.
        prot: u64,
    },
    /// See [`EventKind::QuotaDenied`].
    QuotaDenied {
        /// The process.
        pid: u32,
        /// Which quota (None if unknown).
        quota: Option<QuotaKind>,
        /// What the request would have brought the total to (in the quota's
        /// [`QuotaKind::unit`]).
        requested: u64,
        /// The quota.
        limit: u64,
    },
    /// See [`EventKind::QuotaPressure`].
    QuotaPressure {
        /// The process.
        pid: u32,
        /// Which quota (None if unknown).
        quota: Option<QuotaKind>,
        /// Bytes in use.
        used: u64,
        /// The quota.
        limit: u64,
    },
    /// See [`EventKind::FramePoolLow`].
    FramePoolLow {
        /// Free frames.
        free_frames: u64,
        /// Frames managed.
        total_frames: u64,
    },
    /// See [`EventKind::ShmCreated`] (`pid` is the owner).
    ShmCreated {
        /// The owner.
        pid: u32,
        /// The region id (`MEM_SHARE:<id>`).
        region: u64,
        /// Length in bytes.
        len: u64,
        /// The owner's rights.
        rights: u64,
    },
    /// See [`EventKind::ShmGranted`] (`pid` is the granter).
    ShmGranted {
        /// The granter.
        pid: u32,
        /// The region id.
        region: u64,
        /// Who was offered the capability.
        grantee: u64,
        /// Its rights.
        rights: u64,
    },
    /// See [`EventKind::ShmAccepted`] (`pid` is the grantee).
    ShmAccepted {
        /// The grantee, now holding the capability.
        pid: u32,
        /// The region id.
        region: u64,
        /// Who offered it.
        granter: u64,
        /// Its rights.
        rights: u64,
    },
    /// See [`EventKind::ShmMapped`].
    ShmMapped {
        /// The participant.
        pid: u32,
        /// The region id.
        region: u64,
        /// Where it is mapped.
        addr: u64,
        /// `PROT_*` bits.
        prot: u64,
    },
    /// See [`EventKind::ShmUnmapped`].
    ShmUnmapped {
        /// The participant.
        pid: u32,
        /// The region id.
        region: u64,
        /// Where it was mapped.
        addr: u64,
    },
    /// See [`EventKind::ShmRevoked`] (`pid` is the owner who revoked).
    ShmRevoked {
        /// The owner.
        pid: u32,
        /// The region id.
        region: u64,
        /// Who lost access.
        target: u64,
        /// Where the target had it mapped (0 if it had not).
        addr: u64,
    },
    /// See [`EventKind::ShmDestroyed`].
    ShmDestroyed {
        /// The owner.
        pid: u32,
        /// The region id.
        region: u64,
        /// Frames scrubbed and freed.
        frames_freed: u64,
    },
    /// See [`EventKind::KernelShutdown`].
    KernelShutdown {
        /// Free frames at shutdown.
        free_frames: u64,
        /// Frames managed.
        total_frames: u64,
        /// Processes created since boot.
        spawned: u64,
    },
}

/// An event record whose kind the reader does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownEventKind(pub u32);

impl EventRecord {
    /// Decodes the record into a typed [`Event`].
    pub fn decode(&self) -> Result<Event, UnknownEventKind> {
        let [a0, a1, a2, a3, a4] = self.args;
        let pid = self.pid;
        let kind = EventKind::from_raw(u32::from(self.kind)).ok_or(UnknownEventKind(u32::from(self.kind)))?;
        Ok(match kind {
            EventKind::KernelReady => Event::KernelReady {
                gate_kind: a0 as u32,
                free_frames: a1,
                total_frames: a2,
                cpus: a3 as u32,
            },
            EventKind::GateSelfTestFailed => {
                Event::GateSelfTestFailed { gate_kind: a0 as u32, vector: a1, rip: a2, error_code: a3 }
            }
            EventKind::ProcessSpawned => Event::ProcessSpawned { pid, spec_index: a0, pml4_gpa: a1 },
            EventKind::SpawnFailed => Event::SpawnFailed {
                spec_index: a0,
                error: u32::try_from(a1).ok().and_then(SpawnError::from_raw),
            },
            EventKind::ProcessExited => Event::ProcessExited { pid, code: a0 as i64, preemptions: a1 },
            EventKind::ProcessKilled => Event::ProcessKilled {
                pid,
                fault: u32::try_from(a0).ok().and_then(FaultKind::from_raw),
                addr: a1,
                rip: a2,
                error_code: a3,
                vector: a4,
            },
            EventKind::HypercallRefused => Event::HypercallRefused { port: a0, status: a1 },
            EventKind::MemMapped => Event::MemMapped { pid, addr: a0, len: a1, prot: a2 },
            EventKind::MemUnmapped => Event::MemUnmapped { pid, addr: a0, len: a1, freed_pages: a2 },
            EventKind::MemProtected => Event::MemProtected { pid, addr: a0, len: a1, prot: a2 },
            EventKind::QuotaDenied => Event::QuotaDenied {
                pid,
                quota: u32::try_from(a0).ok().and_then(QuotaKind::from_raw),
                requested: a1,
                limit: a2,
            },
            EventKind::QuotaPressure => Event::QuotaPressure {
                pid,
                quota: u32::try_from(a0).ok().and_then(QuotaKind::from_raw),
                used: a1,
                limit: a2,
            },
            EventKind::FramePoolLow => Event::FramePoolLow { free_frames: a0, total_frames: a1 },
            EventKind::KernelShutdown => {
                Event::KernelShutdown { free_frames: a0, total_frames: a1, spawned: a2 }
            }
            EventKind::ShmCreated => Event::ShmCreated { pid, region: a0, len: a1, rights: a2 },
            EventKind::ShmGranted => Event::ShmGranted { pid, region: a0, grantee: a1, rights: a2 },
            EventKind::ShmMapped => Event::ShmMapped { pid, region: a0, addr: a1, prot: a2 },
            EventKind::ShmUnmapped => Event::ShmUnmapped { pid, region: a0, addr: a1 },
            EventKind::ShmRevoked => Event::ShmRevoked { pid, region: a0, target: a1, addr: a2 },
            EventKind::ShmDestroyed => Event::ShmDestroyed { pid, region: a0, frames_freed: a1 },
            EventKind::ShmAccepted => Event::ShmAccepted { pid, region: a0, granter: a1, rights: a2 },
        })
    }
}

impl Event {
    /// Encodes the event into a record (`seq` and `tick` are left zero for the
    /// ring to fill in).
    pub fn encode(&self) -> EventRecord {
        let (kind, pid, args) = match *self {
            Event::KernelReady { gate_kind, free_frames, total_frames, cpus } => {
                (EventKind::KernelReady, 0, [gate_kind as u64, free_frames, total_frames, cpus as u64, 0])
            }
            Event::GateSelfTestFailed { gate_kind, vector, rip, error_code } => {
                (EventKind::GateSelfTestFailed, 0, [gate_kind as u64, vector, rip, error_code, 0])
            }
            Event::ProcessSpawned { pid, spec_index, pml4_gpa } => {
                (EventKind::ProcessSpawned, pid, [spec_index, pml4_gpa, 0, 0, 0])
            }
            Event::SpawnFailed { spec_index, error } => {
                (EventKind::SpawnFailed, 0, [spec_index, error.map_or(0, |e| e as u64), 0, 0, 0])
            }
            Event::ProcessExited { pid, code, preemptions } => {
                (EventKind::ProcessExited, pid, [code as u64, preemptions, 0, 0, 0])
            }
            Event::ProcessKilled { pid, fault, addr, rip, error_code, vector } => (
                EventKind::ProcessKilled,
                pid,
                [fault.map_or(0, |f| f as u64), addr, rip, error_code, vector],
            ),
            Event::HypercallRefused { port, status } => {
                (EventKind::HypercallRefused, 0, [port, status, 0, 0, 0])
            }
            Event::MemMapped { pid, addr, len, prot } => (EventKind::MemMapped, pid, [addr, len, prot, 0, 0]),
            Event::MemUnmapped { pid, addr, len, freed_pages } => {
                (EventKind::MemUnmapped, pid, [addr, len, freed_pages, 0, 0])
            }
            Event::MemProtected { pid, addr, len, prot } => {
                (EventKind::MemProtected, pid, [addr, len, prot, 0, 0])
            }
            Event::QuotaDenied { pid, quota, requested, limit } => {
                (EventKind::QuotaDenied, pid, [quota.map_or(0, |q| q as u64), requested, limit, 0, 0])
            }
            Event::QuotaPressure { pid, quota, used, limit } => {
                (EventKind::QuotaPressure, pid, [quota.map_or(0, |q| q as u64), used, limit, 0, 0])
            }
            Event::FramePoolLow { free_frames, total_frames } => {
                (EventKind::FramePoolLow, 0, [free_frames, total_frames, 0, 0, 0])
            }
            Event::KernelShutdown { free_frames, total_frames, spawned } => {
                (EventKind::KernelShutdown, 0, [free_frames, total_frames, spawned, 0, 0])
            }
            Event::ShmCreated { pid, region, len, rights } => {
                (EventKind::ShmCreated, pid, [region, len, rights, 0, 0])
            }
            Event::ShmGranted { pid, region, grantee, rights } => {
                (EventKind::ShmGranted, pid, [region, grantee, rights, 0, 0])
            }
            Event::ShmMapped { pid, region, addr, prot } => {
                (EventKind::ShmMapped, pid, [region, addr, prot, 0, 0])
            }
            Event::ShmUnmapped { pid, region, addr } => {
                (EventKind::ShmUnmapped, pid, [region, addr, 0, 0, 0])
            }
            Event::ShmRevoked { pid, region, target, addr } => {
                (EventKind::ShmRevoked, pid, [region, target, addr, 0, 0])
            }
            Event::ShmDestroyed { pid, region, frames_freed } => {
                (EventKind::ShmDestroyed, pid, [region, frames_freed, 0, 0, 0])
            }
            Event::ShmAccepted { pid, region, granter, rights } => {
                (EventKind::ShmAccepted, pid, [region, granter, rights, 0, 0])
            }
        };
        EventRecord { seq: 0, tick: 0, kind: kind as u16, cpu: 0, pid, args }
    }
}

struct ProtName(u64);

impl core::fmt::Display for ProtName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        use crate::syscall::{PROT_EXEC, PROT_READ, PROT_WRITE};
        let bit = |mask: u64, c: char| if self.0 & mask != 0 { c } else { '-' };
        write!(f, "{}{}{}", bit(PROT_READ, 'r'), bit(PROT_WRITE, 'w'), bit(PROT_EXEC, 'x'))
    }
}

struct RightsName(u64);

impl core::fmt::Display for RightsName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        use crate::syscall::{RIGHT_GRANT, RIGHT_READ, RIGHT_WRITE};
        let bit = |mask: u64, c: char| if self.0 & mask != 0 { c } else { '-' };
        write!(f, "{}{}{}", bit(RIGHT_READ, 'r'), bit(RIGHT_WRITE, 'w'), bit(RIGHT_GRANT, 'g'))
    }
}

struct OptName<T>(Option<T>);

impl<T: core::fmt::Display> core::fmt::Display for OptName<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match &self.0 {
            Some(value) => value.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

/// `n` and a noun, plural unless `n` is 1 ("1 frame", "2 frames", "3 processes").
struct Count<N>(N, &'static str);

impl<N: Copy + Into<u64> + core::fmt::Display> core::fmt::Display for Count<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let Count(n, noun) = *self;
        let plural = match (n.into() == 1, noun.ends_with('s')) {
            (true, _) => "",
            (false, true) => "es",
            (false, false) => "s",
        };
        write!(f, "{n} {noun}{plural}")
    }
}

impl core::fmt::Display for Event {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        use crate::syscall::gate_kind_name;
        match *self {
            Event::KernelReady { gate_kind, free_frames, total_frames, cpus } => write!(
                f,
                "kernel ready: gate={}, {free_frames} of {total_frames} frames free, {}",
                gate_kind_name(gate_kind),
                Count(cpus, "CPU")
            ),
            Event::GateSelfTestFailed { gate_kind, vector, rip, error_code } => write!(
                f,
                "gate self-test failed for {}: vector {vector} at rip {rip:#x} (error {error_code:#x})",
                gate_kind_name(gate_kind)
            ),
            Event::ProcessSpawned { pid, spec_index, pml4_gpa } => {
                write!(f, "pid {pid} spawned (boot process #{spec_index}, pml4 at {pml4_gpa:#x})")
            }
            Event::SpawnFailed { spec_index, error } => {
                write!(f, "boot process #{spec_index} not started: {}", OptName(error))
            }
            Event::ProcessExited { pid, code, preemptions } => {
                write!(f, "pid {pid} exited with code {code} (preempted {})", Count(preemptions, "time"))
            }
            Event::ProcessKilled { pid, fault, addr, rip, error_code, vector } => write!(
                f,
                "pid {pid} killed: {} at {addr:#x} (rip {rip:#x}, vector {vector}, error {error_code:#x})",
                OptName(fault)
            ),
            Event::HypercallRefused { port, status } => {
                write!(f, "malformed hypercall to port {port:#x} refused with status {status}")
            }
            Event::MemMapped { pid, addr, len, prot } => {
                write!(f, "pid {pid} mapped {len:#x} bytes at {addr:#x} ({})", ProtName(prot))
            }
            Event::MemUnmapped { pid, addr, len, freed_pages } => {
                let freed = Count(freed_pages, "resident page");
                write!(f, "pid {pid} unmapped {len:#x} bytes at {addr:#x} ({freed} freed)")
            }
            Event::MemProtected { pid, addr, len, prot } => {
                write!(f, "pid {pid} protected {len:#x} bytes at {addr:#x} as {}", ProtName(prot))
            }
            Event::QuotaDenied { pid, quota, requested, limit } => write!(
                f,
                "pid {pid} denied: {} quota of {limit} {unit} would be exceeded ({requested} {unit})",
                OptName(quota),
                unit = quota_unit(quota)
            ),
            Event::QuotaPressure { pid, quota, used, limit } => write!(
                f,
                "pid {pid} memory pressure: {} usage {used} of {limit} {}",
                OptName(quota),
                quota_unit(quota)
            ),
            Event::FramePoolLow { free_frames, total_frames } => {
                write!(f, "free-frame pool low: {free_frames} of {total_frames} frames free")
            }
            Event::KernelShutdown { free_frames, total_frames, spawned } => write!(
                f,
                "kernel shutting down: {free_frames} of {total_frames} frames free, {} created",
                Count(spawned, "process")
            ),
            Event::ShmCreated { pid, region, len, rights } => {
                write!(
                    f,
                    "pid {pid} created MEM_SHARE:{region} ({len:#x} bytes, rights {})",
                    RightsName(rights)
                )
            }
            Event::ShmGranted { pid, region, grantee, rights } => {
                write!(
                    f,
                    "pid {pid} offered MEM_SHARE:{region} to pid {grantee} (rights {})",
                    RightsName(rights)
                )
            }
            Event::ShmAccepted { pid, region, granter, rights } => write!(
                f,
                "pid {pid} accepted MEM_SHARE:{region} from pid {granter} (rights {})",
                RightsName(rights)
            ),
            Event::ShmMapped { pid, region, addr, prot } => {
                write!(f, "pid {pid} mapped MEM_SHARE:{region} at {addr:#x} ({})", ProtName(prot))
            }
            Event::ShmUnmapped { pid, region, addr } => {
                write!(f, "pid {pid} unmapped MEM_SHARE:{region} at {addr:#x}")
            }
            Event::ShmRevoked { pid, region, target, addr } => {
                write!(f, "pid {pid} revoked MEM_SHARE:{region} from pid {target}")?;
                if addr != 0 {
                    write!(f, " (unmapped at {addr:#x})")?;
                }
                Ok(())
            }
            Event::ShmDestroyed { pid, region, frames_freed } => {
                write!(f, "MEM_SHARE:{region} destroyed by pid {pid}: {} freed", Count(frames_freed, "frame"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_plural_unless_one() {
        extern crate std;
        use std::string::ToString;
        assert_eq!(Count(1u32, "frame").to_string(), "1 frame");
        assert_eq!(Count(0u64, "frame").to_string(), "0 frames");
        assert_eq!(Count(3u32, "process").to_string(), "3 processes");
        assert_eq!(Count(1u32, "process").to_string(), "1 process");
        let exit = Event::ProcessExited { pid: 2, code: 0, preemptions: 1 }.to_string();
        assert_eq!(exit, "pid 2 exited with code 0 (preempted 1 time)");
        let shutdown = Event::KernelShutdown { free_frames: 5, total_frames: 9, spawned: 1 }.to_string();
        assert_eq!(shutdown, "kernel shutting down: 5 of 9 frames free, 1 process created");
    }

    #[test]
    fn events_round_trip_through_records() {
        let events = [
            Event::KernelReady { gate_kind: 2, free_frames: 10, total_frames: 20, cpus: 2 },
            Event::GateSelfTestFailed {
                gate_kind: 1,
                vector: 14,
                rip: 0xffff_ffff_8010_0000,
                error_code: 0x15,
            },
            Event::ProcessSpawned { pid: 3, spec_index: 1, pml4_gpa: 0x20_0000 },
            Event::SpawnFailed { spec_index: 2, error: Some(SpawnError::WritableAndExecutable) },
            Event::ProcessExited { pid: 4, code: -7, preemptions: 9 },
            Event::ProcessKilled {
                pid: 5,
                fault: Some(FaultKind::WriteToCode),
                addr: 0x40_1000,
                rip: 0x40_1003,
                error_code: 7,
                vector: 14,
            },
            Event::HypercallRefused { port: 0x501, status: 1 },
            Event::MemMapped { pid: 1, addr: 0x1_0000_0000, len: 0x2000, prot: 3 },
            Event::MemUnmapped { pid: 1, addr: 0x1_0000_0000, len: 0x2000, freed_pages: 1 },
            Event::MemProtected { pid: 1, addr: 0x1_0000_0000, len: 0x1000, prot: 1 },
            Event::QuotaDenied { pid: 2, quota: Some(QuotaKind::Virtual), requested: 10, limit: 5 },
            Event::QuotaPressure { pid: 2, quota: Some(QuotaKind::Resident), used: 9, limit: 10 },
            Event::FramePoolLow { free_frames: 3, total_frames: 100 },
            Event::KernelShutdown { free_frames: 90, total_frames: 100, spawned: 4 },
            Event::ShmCreated { pid: 1, region: 3, len: 0x4000, rights: 7 },
            Event::ShmGranted { pid: 1, region: 3, grantee: 2, rights: 1 },
            Event::ShmMapped { pid: 2, region: 3, addr: 0x1_0000_0000, prot: 1 },
            Event::ShmUnmapped { pid: 2, region: 3, addr: 0x1_0000_0000 },
            Event::ShmRevoked { pid: 1, region: 3, target: 2, addr: 0x1_0000_0000 },
            Event::ShmDestroyed { pid: 1, region: 3, frames_freed: 4 },
            Event::ShmAccepted { pid: 2, region: 3, granter: 1, rights: 1 },
        ];
        for event in events {
            assert_eq!(event.encode().decode(), Ok(event));
        }
    }

    #[test]
    fn unknown_kinds_and_codes_are_reported_not_trusted() {
        let record = EventRecord { kind: 999, ..Default::default() };
        assert_eq!(record.decode(), Err(UnknownEventKind(999)));
        let record = EventRecord {
            kind: EventKind::ProcessKilled as u16,
            args: [77, 0, 0, 0, 0],
            ..Default::default()
        };
        match record.decode() {
            Ok(Event::ProcessKilled { fault: None, .. }) => {}
            other => panic!("unexpected decode {other:?}"),
        }
    }

    #[test]
    fn fault_names_are_unique_and_round_trip() {
        for fault in FaultKind::ALL {
            assert_eq!(FaultKind::from_name(fault.name()), Some(*fault));
            assert_eq!(FaultKind::from_raw(*fault as u32), Some(*fault));
        }
        assert_eq!(FaultKind::from_name("no-such-fault"), None);
    }
}
