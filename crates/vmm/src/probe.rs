//! Host detection: hardware KVM or not, which VMM binaries exist, and the
//! choice of backend that follows from them.
//!
//! "Hardware KVM" means the CPU advertises VMX or SVM, the matching KVM
//! module (`kvm_intel`/`kvm_amd`) is loaded and `/dev/kvm` opens. A host
//! whose `/dev/kvm` is PVM (`kvm_pvm`, paravirtualized KVM inside a VM
//! without nested virtualization) does *not* count: ordinary Linux guests
//! cannot run on it, so QEMU falls back to TCG there.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::process::find_binary;
use crate::BackendKind;

/// Environment variable naming the Firecracker binary.
pub const FIRECRACKER_ENV: &str = "BHATTI_FIRECRACKER";
/// Environment variable naming the QEMU binary.
pub const QEMU_ENV: &str = "BHATTI_QEMU";
/// The QEMU binary looked up on PATH.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// What the host offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProbe {
    /// VMX/SVM in the CPU flags, `kvm_intel`/`kvm_amd` loaded, `/dev/kvm`
    /// openable read-write.
    pub hardware_kvm: bool,
    /// `/dev/kvm` is provided by `kvm_pvm`.
    pub pvm: bool,
    pub firecracker: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
}

/// Which backend the operator asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendPref {
    #[default]
    Auto,
    Firecracker,
    Qemu,
}

impl std::str::FromStr for BackendPref {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendPref::Auto),
            "firecracker" => Ok(BackendPref::Firecracker),
            "qemu" => Ok(BackendPref::Qemu),
            other => Err(format!(
                "unknown backend {other:?} (auto, firecracker or qemu)"
            )),
        }
    }
}

/// Looks at the host.
pub fn probe() -> HostProbe {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let kvm_module =
        Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists();
    let dev_kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    HostProbe {
        hardware_kvm: cpu_has_virt(&cpuinfo) && kvm_module && dev_kvm,
        pvm: Path::new("/sys/module/kvm_pvm").exists(),
        firecracker: env_or_path(FIRECRACKER_ENV, "firecracker"),
        qemu: env_or_path(QEMU_ENV, QEMU_BINARY),
    }
}

fn env_or_path(var: &str, name: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => find_binary(Some(Path::new(&p)), name),
        _ => find_binary(None, name),
    }
}

/// True if any `flags` line of `/proc/cpuinfo` lists `vmx` or `svm`.
pub fn cpu_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim() == "flags")
        .any(|(_, v)| v.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

impl HostProbe {
    /// Picks a backend for `pref`. Auto: Firecracker when it is installed
    /// and the host has hardware KVM, else QEMU (TCG without hardware KVM).
    pub fn choose(&self, pref: BackendPref) -> Result<BackendKind, String> {
        match pref {
            BackendPref::Firecracker => {
                if self.firecracker.is_none() {
                    Err(format!(
                        "firecracker was requested but is not installed (set {FIRECRACKER_ENV} or put it on PATH)"
                    ))
                } else if !self.hardware_kvm {
                    Err(format!(
                        "firecracker was requested but this host has no hardware KVM{} \
                         (use the qemu backend, which falls back to TCG)",
                        if self.pvm { " (/dev/kvm is PVM)" } else { "" }
                    ))
                } else {
                    Ok(BackendKind::Firecracker)
                }
            }
            BackendPref::Qemu => {
                if self.qemu.is_some() {
                    Ok(BackendKind::Qemu)
                } else {
                    Err(format!(
                        "qemu was requested but {QEMU_BINARY} is not installed (set {QEMU_ENV} or put it on PATH)"
                    ))
                }
            }
            BackendPref::Auto => {
                if self.hardware_kvm && self.firecracker.is_some() {
                    Ok(BackendKind::Firecracker)
                } else if self.qemu.is_some() {
                    Ok(BackendKind::Qemu)
                } else if self.firecracker.is_some() {
                    Err(format!(
                        "firecracker is installed but this host has no hardware KVM, and \
                         {QEMU_BINARY} (which would run guests under TCG) is not installed"
                    ))
                } else {
                    Err(format!(
                        "no VMM found: install firecracker (needs hardware KVM) or {QEMU_BINARY}"
                    ))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(hw: bool, fc: bool, qemu: bool) -> HostProbe {
        HostProbe {
            hardware_kvm: hw,
            pvm: !hw,
            firecracker: fc.then(|| PathBuf::from("/usr/bin/firecracker")),
            qemu: qemu.then(|| PathBuf::from("/usr/bin/qemu-system-x86_64")),
        }
    }

    #[test]
    fn auto() {
        use BackendKind::*;
        assert_eq!(
            host(true, true, true).choose(BackendPref::Auto),
            Ok(Firecracker)
        );
        assert_eq!(
            host(true, true, false).choose(BackendPref::Auto),
            Ok(Firecracker)
        );
        assert_eq!(host(true, false, true).choose(BackendPref::Auto), Ok(Qemu));
        assert_eq!(host(false, true, true).choose(BackendPref::Auto), Ok(Qemu));
        assert_eq!(host(false, false, true).choose(BackendPref::Auto), Ok(Qemu));
        assert!(host(false, true, false).choose(BackendPref::Auto).is_err());
        assert!(host(true, false, false).choose(BackendPref::Auto).is_err());
        assert!(host(false, false, false).choose(BackendPref::Auto).is_err());
    }

    #[test]
    fn explicit() {
        use BackendKind::*;
        assert_eq!(
            host(true, true, false).choose(BackendPref::Firecracker),
            Ok(Firecracker)
        );
        let e = host(false, true, true)
            .choose(BackendPref::Firecracker)
            .unwrap_err();
        assert!(e.contains("PVM"), "{e}");
        assert!(host(true, false, true)
            .choose(BackendPref::Firecracker)
            .is_err());
        assert_eq!(host(false, false, true).choose(BackendPref::Qemu), Ok(Qemu));
        assert_eq!(host(true, true, true).choose(BackendPref::Qemu), Ok(Qemu));
        assert!(host(true, true, false).choose(BackendPref::Qemu).is_err());
    }

    #[test]
    fn cpu_flags() {
        let intel = "processor\t: 0\nflags\t\t: fpu vme de pse vmx ept\n";
        let amd = "flags\t\t: fpu svm npt\n";
        let pvm = "flags\t\t: fpu vme hypervisor lahf_lm\nvmx flags\t: ept\n";
        assert!(cpu_has_virt(intel));
        assert!(cpu_has_virt(amd));
        // "vmx flags" is a different key and must not count.
        assert!(!cpu_has_virt(pvm));
        assert!(!cpu_has_virt(""));
    }

    #[test]
    fn probe_this_host() {
        // Smoke test: must not panic; prints what it found.
        let p = probe();
        eprintln!("{p:?} -> auto: {:?}", p.choose(BackendPref::Auto));
        if p.hardware_kvm {
            assert!(!p.pvm || cpu_has_virt(&std::fs::read_to_string("/proc/cpuinfo").unwrap()));
        }
    }

    #[test]
    fn pref_parse() {
        assert_eq!("auto".parse::<BackendPref>(), Ok(BackendPref::Auto));
        assert_eq!("qemu".parse::<BackendPref>(), Ok(BackendPref::Qemu));
        assert!("kvm".parse::<BackendPref>().is_err());
    }
}
