//! Host-side resource limits of one VMM process, derived from its VM's
//! size: what the cgroup (or the jailer's cgroup flags) enforces so that a
//! guest, or a compromised VMM, cannot take more than its share of the host.

use crate::VmConfig;

/// CFS period the CPU quota is expressed in.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Memory the VMM process itself needs beside the guest's RAM (page tables,
/// device emulation, QEMU's code and heap): generous, so a healthy VMM never
/// meets the limit.
pub const MEMORY_OVERHEAD_MIB: u64 = 256;
/// Threads and processes: a VMM has one thread per vCPU plus a handful of
/// I/O and API threads; QEMU's TCG adds a few more.
pub const PIDS_MAX: u64 = 256;

/// Limits for one VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    /// `cpu.max` quota: one full CPU per vCPU.
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    /// `memory.max`: guest memory plus [`MEMORY_OVERHEAD_MIB`].
    pub memory_bytes: u64,
    pub pids_max: u64,
}

/// TCG's translation cache (`-accel tcg,tb-size=`), MiB: QEMU's default
/// on a roomy 64-bit host is 1 GiB, which made a confined TCG guest with
/// 512 MiB run into its memory limit (OOM-killed in the API tests).
pub const TCG_TB_MIB: u64 = 256;
/// What TCG needs beside the guest on top of [`MEMORY_OVERHEAD_MIB`]: the
/// translation cache and its bookkeeping.
pub const TCG_OVERHEAD_MIB: u64 = TCG_TB_MIB + 128;

impl ResourceLimits {
    /// [`ResourceLimits::for_vm`] for a VMM that emulates the CPU (QEMU's
    /// TCG): more memory for its translation cache.
    pub fn for_emulated_vm(cfg: &VmConfig) -> ResourceLimits {
        let mut l = ResourceLimits::for_vm(cfg);
        l.memory_bytes += TCG_OVERHEAD_MIB << 20;
        l
    }

    pub fn for_vm(cfg: &VmConfig) -> ResourceLimits {
        ResourceLimits {
            cpu_quota_us: u64::from(cfg.vcpus.max(1)) * CPU_PERIOD_US,
            cpu_period_us: CPU_PERIOD_US,
            memory_bytes: (u64::from(cfg.memory_mib) + MEMORY_OVERHEAD_MIB) << 20,
            pids_max: PIDS_MAX,
        }
    }

    /// cgroup v2 `cpu.max`: `"<quota> <period>"`.
    pub fn cpu_max(&self) -> String {
        format!("{} {}", self.cpu_quota_us, self.cpu_period_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm_size() {
        let mut cfg = crate::test_vm_config("x");
        cfg.vcpus = 2;
        cfg.memory_mib = 512;
        let l = ResourceLimits::for_vm(&cfg);
        assert_eq!(l.cpu_max(), "200000 100000");
        assert_eq!(l.memory_bytes, (512 + 256) << 20);
        assert_eq!(l.pids_max, 256);
    }
}
