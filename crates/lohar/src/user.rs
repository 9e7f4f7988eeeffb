//! Building the environment and credentials user commands run with.
