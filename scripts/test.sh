#!/usr/bin/env bash
# The test command: builds or reuses the guest kernel, rootfs and agent,
# then runs every test in the workspace, including the ones that boot real
# VMs (QEMU microvm; Firecracker too when a binary is found via
# BHATTI_FIRECRACKER or PATH). Run as root on Linux with /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "test.sh: run as root (VM tests create TAPs, namespaces and mounts)" >&2
  exit 1
fi
eval "$(scripts/artifacts.sh)"
echo "test.sh: kernel=$BHATTI_KERNEL rootfs=$BHATTI_ROOTFS lohar=$BHATTI_LOHAR" >&2
# cargo test hides a passing test's output, so say here what will skip.
if [ -z "${BHATTI_FIRECRACKER:-}" ] && ! command -v firecracker >/dev/null; then
  echo "test.sh: SKIP Firecracker lifecycle suite: no Firecracker binary (set BHATTI_FIRECRACKER or put it on PATH)" >&2
fi
cargo test --workspace --locked "$@"
