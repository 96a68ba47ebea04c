//! Issue 16's budgets (ring-0 instructions per operation, the
//! machine-independent figure) and where a stepped operation's
//! instructions go (`bench --profile`).

use crate::diagnose::KernelSymbols;
use std::collections::BTreeMap;

/// 4 KiB messages in the `stream-ipc` row's 1 MiB.
const MESSAGES_PER_MIB: f64 = 256.0;

/// The budget of the row named `row`, in ring-0 instructions per
/// operation, if issue 16 gives it one.
pub fn budget(row: &str) -> Option<f64> {
    Some(match row {
        "syscall" => 60.0,
        "yield" => 150.0,
        "ipc-rtt" => 800.0,
        // 700 per 4 KiB message, copying included.
        "stream-ipc" => 700.0 * MESSAGES_PER_MIB,
        "mem-1" => 1_200.0,
        "shm-cycle" => 2_500.0,
        "cap-list" => 400.0,
        "exit" => 3_000.0,
        "spawn" => 8_000.0,
        "boot.first-user" => 25_000.0,
        "worst-entry" => 50_000.0,
        _ => return None,
    })
}

/// The kernel function (or assembly label) an instruction address lies
/// in, without the crate prefix every one shares (`trap_common`,
/// `<kernel::memory::KernelMemory>::reap`), or the address if none does.
fn function(symbols: &KernelSymbols, address: u64) -> String {
    match symbols.function(address) {
        Some(name) => name.replace("guest_kernel::", ""),
        None => format!("{address:#x}"),
    }
}

/// Stepped instruction counts by address (`pcs`), attributed to kernel
/// functions and divided by `operations`: the most expensive first, ties
/// by name.
pub fn profile(pcs: &BTreeMap<u64, u64>, operations: f64, symbols: &KernelSymbols) -> Vec<(String, f64)> {
    if operations <= 0.0 {
        return Vec::new();
    }
    let mut by_function: BTreeMap<String, u64> = BTreeMap::new();
    for (&pc, &count) in pcs {
        *by_function.entry(function(symbols, pc)).or_default() += count;
    }
    let mut profile: Vec<(String, f64)> =
        by_function.into_iter().map(|(name, count)| (name, count as f64 / operations)).collect();
    profile.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    profile
}

/// Stepped instruction counts by address, divided by `operations`.
pub fn per_operation(pcs: &BTreeMap<u64, u64>, operations: f64) -> BTreeMap<u64, f64> {
    if operations <= 0.0 {
        return BTreeMap::new();
    }
    pcs.iter().map(|(&pc, &count)| (pc, count as f64 / operations)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_issue_16s() {
        assert_eq!(budget("syscall"), Some(60.0));
        assert_eq!(budget("stream-ipc"), Some(179_200.0));
        assert_eq!(budget("fault"), None);
    }

    #[test]
    fn instructions_are_attributed_to_the_kernel_functions_they_lie_in() {
        let symbols = KernelSymbols::parse(crate::images::KERNEL_ELF);
        let common = symbols.address("trap_common").expect("trap_common");
        let dispatch = symbols.address("trap_dispatch").expect("trap_dispatch");
        let pcs: BTreeMap<u64, u64> = [(common, 4), (common + 1, 4), (dispatch, 2), (0x1234, 2)].into();
        assert_eq!(per_operation(&pcs, 2.0)[&common], 2.0);
        let profile = profile(&pcs, 2.0, &symbols);
        assert_eq!(
            profile,
            [
                ("trap_common".to_string(), 4.0),
                ("0x1234".to_string(), 1.0),
                ("trap_dispatch".to_string(), 1.0)
            ]
        );
        assert!(super::profile(&pcs, 0.0, &symbols).is_empty());
    }
}
