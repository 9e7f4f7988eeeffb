//! Firecracker backend (to be implemented).
