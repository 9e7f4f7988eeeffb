//! A local OCI registry for image tests: Debian's `docker-registry` on a
//! free 127.0.0.1 port (optionally behind htpasswd), killed by its pid and
//! reaped when dropped, also when the test fails. Images are built without
//! Docker by `umoci` and pushed by `skopeo`.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tools image tests need (scripts/install-deps.sh installs them).
pub const TOOLS: [&str; 5] = [
    "docker-registry",
    "umoci",
    "skopeo",
    "htpasswd",
    "mkfs.ext4",
];

/// The first of [`TOOLS`] that is not installed.
pub fn missing_tool() -> Option<&'static str> {
    TOOLS.into_iter().find(|t| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A registry process.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Starts one on a free loopback port; with `creds`, behind htpasswd.
    pub fn start(creds: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("storage").display()
        );
        if let Some((user, pass)) = creds {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .expect("htpasswd");
            assert!(out.status.success(), "htpasswd failed");
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, out.stdout).expect("write htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: bhatti-test\n    path: {}\n",
                file.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");
        let registry = Registry {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(Instant::now() < deadline, "registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// Pushes the OCI layout image `layout:tag` as `<registry>/<name>`.
    pub fn push(&self, layout_image: &str, name: &str, creds: Option<&str>) -> String {
        let reference = format!("{}/{name}", self.addr);
        let mut push = Command::new("skopeo");
        push.args(["copy", "--dest-tls-verify=false"]);
        if let Some(c) = creds {
            push.args(["--dest-creds", c]);
        }
        push.arg(format!("oci:{layout_image}"))
            .arg(format!("docker://{reference}"));
        run(&mut push);
        reference
    }
}

/// An OCI layout being built with umoci: `<dir>/layout:<tag>`.
pub struct Layout {
    /// `<layout dir>:<tag>`, as umoci and skopeo's `oci:` name it.
    pub image: String,
    dir: std::path::PathBuf,
    layers: u32,
}

impl Layout {
    /// A new empty image in `dir`.
    pub fn new(dir: &Path, tag: &str) -> Layout {
        let layout = dir.join("layout");
        let image = format!("{}:{tag}", layout.display());
        run(Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout));
        run(Command::new("umoci").args(["new", "--image", &image]));
        Layout {
            image,
            dir: dir.to_path_buf(),
            layers: 0,
        }
    }

    /// Adds a layer: `change` edits the unpacked rootfs (files it adds or
    /// changes, deletions become whiteouts).
    pub fn layer(&mut self, change: impl FnOnce(&Path)) {
        self.layers += 1;
        let bundle = self.dir.join(format!("bundle{}", self.layers));
        run(Command::new("umoci")
            .args(["unpack", "--image", &self.image])
            .arg(&bundle));
        change(&bundle.join("rootfs"));
        run(Command::new("umoci")
            .args(["repack", "--image", &self.image])
            .arg(&bundle));
        let _ = std::fs::remove_dir_all(&bundle);
    }

    /// `umoci config` with these arguments (`--config.env`, …).
    pub fn config(&self, args: &[&str]) {
        run(Command::new("umoci")
            .args(["config", "--image", &self.image])
            .args(args));
    }
}
