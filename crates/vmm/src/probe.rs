//! Host detection: hardware KVM or not, which VMM binaries exist.
