//! Brings the web shell's third-party browser code (xterm.js and its fit
//! addon, pinned in `web/package-lock.json`) from the npm registry with
//! `npm ci` into `$OUT_DIR/web`, where `src/api/webshell.rs` embeds it.
//!
//! Nothing third-party is copied into the repository. The install runs
//! again only when the lock file changes (a stamp beside it holds the
//! lock's contents), so an ordinary rebuild does not call npm; npm's own
//! cache makes a reinstall work offline once it has run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files the daemon embeds, relative to `node_modules`.
const FILES: &[&str] = &[
    "@xterm/xterm/lib/xterm.js",
    "@xterm/xterm/css/xterm.css",
    "@xterm/addon-fit/lib/addon-fit.js",
];

fn main() {
    println!("cargo:rerun-if-changed=web/package.json");
    println!("cargo:rerun-if-changed=web/package-lock.json");
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("web");
    if let Err(e) = install(&manifest.join("web"), &out) {
        panic!("\n\nbhatti's web shell needs xterm.js from the npm registry: {e}\n\n");
    }
}

fn install(src: &Path, out: &Path) -> Result<(), String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let lock = read(&src.join("package-lock.json"))?;
    let package = read(&src.join("package.json"))?;
    let stamp = out.join(".installed-lock");
    let modules = out.join("node_modules");
    let current = std::fs::read(&stamp).is_ok_and(|s| s == lock)
        && FILES.iter().all(|f| modules.join(f).is_file());
    if current {
        return Ok(());
    }
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let write = |name: &str, data: &[u8]| {
        let p = out.join(name);
        std::fs::write(&p, data).map_err(|e| format!("writing {}: {e}", p.display()))
    };
    write("package.json", &package)?;
    write("package-lock.json", &lock)?;
    let npm = std::env::var_os("NPM").unwrap_or_else(|| "npm".into());
    let status = Command::new(&npm)
        .args([
            "ci",
            "--prefer-offline",
            "--no-audit",
            "--no-fund",
            "--ignore-scripts",
            "--loglevel=error",
        ])
        .current_dir(out)
        .status()
        .map_err(|e| {
            format!(
                "cannot run `{}` ({e}); install Node.js and npm (scripts/install-deps.sh does)",
                npm.to_string_lossy()
            )
        })?;
    if !status.success() {
        return Err(format!("`npm ci` in {} failed ({status})", out.display()));
    }
    for f in FILES {
        if !modules.join(f).is_file() {
            return Err(format!("`npm ci` did not install {f}"));
        }
    }
    write(".installed-lock", &lock)
}
