//! QEMU `microvm` backend (to be implemented).
