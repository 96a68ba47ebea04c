//! The SuperOS kernel.
//!
//! Hardware-independent logic lives in modules that build and are unit-tested
//! on the host: [`frame`] (physical frame allocator and ownership table),
//! [`address_space`] (regions, demand paging, quotas, `mem_*` calls),
//! [`capability`] (shared-memory capability tables and rights), [`shared`]
//! (shared regions: grants, mappings, revocation),
//! [`paging`] (page-table
//! construction and walks), [`elf_image`] (user image checks and load plans)
//! [`fault`] (user fault classification) and [`ring`] (the rings the VMM
//! drains). Everything that touches the CPU
//! lives under [`arch`] and [`kernel`], which are only compiled for
//! `x86_64-unknown-none`; all of the kernel's `unsafe` code is there.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

pub mod address_space;
pub mod capability;
pub mod elf_image;
pub mod fault;
pub mod frame;
pub mod paging;
pub mod ring;
pub mod shared;

#[cfg(target_os = "none")]
pub mod arch;
#[cfg(target_os = "none")]
pub mod kernel;
