//! `superos-vmm`: a small VMM that boots the SuperOS kernel on KVM, runs a
//! scenario of user processes, prints what they and the kernel say, and
//! reports how each process ended.
//!
//! Data flow of a run ([`run::run`]): [`scenario`] resolves the programs;
//! [`memory`] allocates guest RAM; [`vm`] creates the KVM VM and vCPU;
//! [`boot`] checks and loads the kernel ELF, places the program images and
//! writes the boot page tables and boot info; the vCPU thread then runs the
//! guest, and every VM exit goes through [`run::handle_exit`] to
//! [`hypercall`], which feeds the [`session`] (console lines, kernel events
//! drained from the [`events`] ring, echoed as text or as JSON by
//! [`event_json`]). A crash is explained by [`diagnose`].
//!
//! Isolation is checked from outside the guest: [`introspect`] reads the
//! kernel's published tables (its claims), [`walk`] walks the page tables
//! itself (the ground truth), [`check`] compares them against the named
//! invariants, and [`monitor`] decides when during a run that happens and
//! what a violation does to it.
//!
//! A run can be examined from outside while it goes on: [`api`] serves a
//! control socket (`run --api`), [`control`] holds the vCPU at a consistent
//! point for each query, [`inspect`] answers (processes, mappings, frames,
//! shared regions, events, checks, translations, dumps), [`inspect_cli`] is
//! `superos-vmm inspect`, [`snapshot`] writes and reads a snapshot file of a
//! stopped guest for the same queries offline, and [`svg`] draws physical
//! memory coloured by owner.
//!
//! The guest kernel is not trusted (see "The VMM's memory bound and its
//! distrust of the kernel" in `docs/ARCHITECTURE.md`): [`session`] keeps a
//! bounded number of events, console bytes and warnings and counts the
//! rest, [`input`] reads the files a user names only if they are regular
//! and within a cap.
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod api;
pub mod aps;
pub mod arch;
pub mod bench;
pub mod boot;
pub mod check;
pub mod console;
pub mod control;
pub mod core_dump;
pub mod cpu;
pub mod debug_trap;
pub mod diagnose;
pub mod event_json;
pub mod events;
pub mod gdb;
pub mod hypercall;
pub mod images;
pub mod input;
pub mod inspect;
pub mod inspect_cli;
pub mod interrupt;
pub mod introspect;
pub mod memory;
pub mod monitor;
pub mod new_project;
pub mod run;
pub mod run_report;
pub mod scenario;
pub mod session;
pub mod snapshot;
pub mod svg;
pub mod trace;
pub mod user_elf;
pub mod vm;
pub mod walk;
pub mod write_log;
