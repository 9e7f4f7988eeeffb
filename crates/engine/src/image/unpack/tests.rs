use super::*;
use std::io::Write;
use std::os::unix::fs::MetadataExt;

/// Builds a layer tarball in memory.
#[derive(Default)]
struct Layer(Vec<Entry>);

/// A header, its body, its PAX records.
type Entry = (tar::Header, Vec<u8>, Vec<(String, Vec<u8>)>);

impl Layer {
    fn header(path: &str, kind: tar::EntryType, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(0);
        // set_path refuses `..`; write the raw name so escapes can be tested.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h
    }
    fn dir(mut self, path: &str) -> Self {
        self.0.push((
            Self::header(path, tar::EntryType::Directory, 0o755),
            vec![],
            vec![],
        ));
        self
    }
    fn file(mut self, path: &str, body: &str) -> Self {
        self.0.push((
            Self::header(path, tar::EntryType::Regular, 0o644),
            body.into(),
            vec![],
        ));
        self
    }
    fn file_owned(mut self, path: &str, body: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(path, tar::EntryType::Regular, mode);
        h.set_uid(uid);
        h.set_gid(gid);
        self.0.push((h, body.into(), vec![]));
        self
    }
    fn file_xattr(mut self, path: &str, body: &str, key: &str, value: &[u8]) -> Self {
        self.0.push((
            Self::header(path, tar::EntryType::Regular, 0o644),
            body.into(),
            vec![(format!("SCHILY.xattr.{key}"), value.to_vec())],
        ));
        self
    }
    fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
        let mut h = Self::header(path, kind, 0o777);
        h.set_link_name_literal(target).unwrap();
        self.0.push((h, vec![], vec![]));
        self
    }
    fn symlink(self, path: &str, target: &str) -> Self {
        self.link(tar::EntryType::Symlink, path, target)
    }
    fn hardlink(self, path: &str, target: &str) -> Self {
        self.link(tar::EntryType::Link, path, target)
    }
    fn bytes(self, gzip: bool) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (mut h, body, pax) in self.0 {
            if !pax.is_empty() {
                b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .unwrap();
            }
            h.set_size(body.len() as u64);
            h.set_cksum();
            b.append(&h, body.as_slice()).unwrap();
        }
        let tar = b.into_inner().unwrap();
        if !gzip {
            return tar;
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    }
    fn apply(self, root: &Path) -> Result<LayerStats, ImageError> {
        apply_layer(root, self.bytes(false).as_slice())
    }
}

fn read(root: &Path, p: &str) -> String {
    fs::read_to_string(root.join(p)).unwrap()
}

#[test]
fn files_dirs_and_gzip() {
    let t = tempfile::tempdir().unwrap();
    let layer = Layer::default()
        .dir("etc/")
        .file("etc/hostname", "box\n")
        .file("deep/er/f", "x");
    let stats = apply_layer(t.path(), layer.bytes(true).as_slice()).unwrap();
    assert_eq!(stats.entries, 3);
    assert_eq!(read(t.path(), "etc/hostname"), "box\n");
    assert_eq!(read(t.path(), "deep/er/f"), "x");
    let m = fs::metadata(t.path().join("etc/hostname")).unwrap();
    assert_eq!(m.mtime(), 1_600_000_000);
}

#[test]
fn whiteout_deletes_a_lower_file_and_a_lower_dir() {
    let t = tempfile::tempdir().unwrap();
    Layer::default()
        .file("a/keep", "1")
        .file("a/gone", "2")
        .file("d/x/y", "3")
        .apply(t.path())
        .unwrap();
    let stats = Layer::default()
        .file("a/.wh.gone", "")
        .file(".wh.d", "")
        .file("a/.wh.never-was", "")
        .apply(t.path())
        .unwrap();
    assert_eq!(stats.whiteouts, 3);
    assert!(t.path().join("a/keep").exists());
    assert!(!t.path().join("a/gone").exists());
    assert!(!t.path().join("a/.wh.gone").exists());
    assert!(!t.path().join("d").exists());
}

#[test]
fn a_whiteout_does_not_hide_an_entry_of_its_own_layer() {
    let t = tempfile::tempdir().unwrap();
    Layer::default().file("f", "old").apply(t.path()).unwrap();
    Layer::default()
        .file("f", "new")
        .file(".wh.f", "")
        .apply(t.path())
        .unwrap();
    assert_eq!(read(t.path(), "f"), "new");
}

#[test]
fn opaque_dir_hides_lower_entries_but_keeps_this_layers() {
    let t = tempfile::tempdir().unwrap();
    Layer::default()
        .file("o/old", "1")
        .file("o/sub/old2", "2")
        .file("other", "3")
        .apply(t.path())
        .unwrap();
    // The marker after a new entry: order within the layer must not matter.
    Layer::default()
        .dir("o/")
        .file("o/sub/new", "n")
        .file("o/.wh..wh..opq", "")
        .file("o/new2", "m")
        .apply(t.path())
        .unwrap();
    assert!(!t.path().join("o/old").exists());
    assert!(!t.path().join("o/sub/old2").exists());
    assert_eq!(read(t.path(), "o/sub/new"), "n");
    assert_eq!(read(t.path(), "o/new2"), "m");
    assert!(t.path().join("other").exists());
    assert!(!t.path().join("o/.wh..wh..opq").exists());
}

#[test]
fn symlinks_and_hard_links() {
    let t = tempfile::tempdir().unwrap();
    Layer::default()
        .file("usr/bin/busybox", "bb")
        .symlink("bin", "usr/bin")
        .hardlink("usr/bin/sh", "usr/bin/busybox")
        .symlink("abs", "/usr/bin/busybox")
        .apply(t.path())
        .unwrap();
    assert_eq!(
        fs::read_link(t.path().join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(
        fs::read_link(t.path().join("abs")).unwrap(),
        Path::new("/usr/bin/busybox")
    );
    let a = fs::metadata(t.path().join("usr/bin/busybox")).unwrap();
    let b = fs::metadata(t.path().join("usr/bin/sh")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    // A later layer writing through the in-rootfs symlink lands in usr/bin.
    Layer::default()
        .file("bin/new", "n")
        .apply(t.path())
        .unwrap();
    assert_eq!(read(t.path(), "usr/bin/new"), "n");
    // A file replaces a symlink (not written through it).
    Layer::default()
        .file("abs", "plain")
        .apply(t.path())
        .unwrap();
    assert_eq!(read(t.path(), "abs"), "plain");
    assert_eq!(read(t.path(), "usr/bin/busybox"), "bb");
}

#[test]
fn modes_and_owners() {
    let t = tempfile::tempdir().unwrap();
    Layer::default()
        .file_owned("s", "x", 0o4755, 1000, 1001)
        .file_owned("ro", "y", 0o400, 0, 0)
        .apply(t.path())
        .unwrap();
    let s = fs::metadata(t.path().join("s")).unwrap();
    assert_eq!(s.mode() & 0o7777, 0o4755);
    if nix::unistd::geteuid().is_root() {
        assert_eq!((s.uid(), s.gid()), (1000, 1001));
    }
    assert_eq!(
        fs::metadata(t.path().join("ro")).unwrap().mode() & 0o7777,
        0o400
    );
}

#[test]
fn xattrs_are_kept_where_the_fs_takes_them() {
    let t = tempfile::tempdir().unwrap();
    let probe = t.path().join("probe");
    fs::write(&probe, "").unwrap();
    if xattr::set(&probe, "user.probe", b"1").is_err() {
        eprintln!(
            "SKIP xattr assertion: {} takes no user.* xattrs",
            t.path().display()
        );
        return;
    }
    Layer::default()
        .file_xattr("f", "x", "user.bhatti", b"yes")
        .apply(t.path())
        .unwrap();
    assert_eq!(
        xattr::get(t.path().join("f"), "user.bhatti")
            .unwrap()
            .as_deref(),
        Some(&b"yes"[..])
    );
}

#[test]
fn a_symlink_to_outside_is_resolved_inside_the_rootfs() {
    let outside = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap();
    // Absolute, relative-climbing, and chained links all stay in the rootfs.
    Layer::default()
        .symlink("a", target)
        .file("a/passwd", "pwned")
        .symlink("b", "../../../../../../..")
        .file("b/escaped", "pwned")
        .symlink("c", "b")
        .file("c/chained", "pwned")
        .apply(t.path())
        .unwrap();
    assert_eq!(
        fs::read_dir(outside.path()).unwrap().count(),
        0,
        "wrote outside the rootfs"
    );
    assert_eq!(
        read(
            t.path(),
            &format!("{}/passwd", target.trim_start_matches('/'))
        ),
        "pwned"
    );
    assert_eq!(read(t.path(), "escaped"), "pwned");
    assert_eq!(read(t.path(), "chained"), "pwned");
    // A hard link to a host file through an escaping symlink finds nothing.
    let host = outside.path().join("secret");
    fs::write(&host, "s").unwrap();
    let err = Layer::default()
        .symlink("h", target)
        .hardlink("stolen", "h/secret")
        .apply(t.path())
        .unwrap_err();
    assert!(err.to_string().contains("target missing"), "{err}");
    assert!(!t.path().join("stolen").exists());
    assert_eq!(fs::metadata(&host).unwrap().nlink(), 1);
}

#[test]
fn dot_dot_is_refused_and_absolute_paths_are_relative() {
    let outside = tempfile::tempdir().unwrap();
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let err = Layer::default()
        .file("../escape", "x")
        .apply(&root)
        .unwrap_err();
    assert!(err.to_string().contains(".."), "{err}");
    assert!(!t.path().join("escape").exists());
    let err = Layer::default()
        .file("a/../../escape", "x")
        .apply(&root)
        .unwrap_err();
    assert!(err.to_string().contains(".."), "{err}");
    let abs = format!("{}/abs", outside.path().display());
    Layer::default().file(&abs, "x").apply(&root).unwrap();
    assert!(!outside.path().join("abs").exists());
    assert_eq!(read(&root, abs.trim_start_matches('/')), "x");
}

#[test]
fn symlink_loops_are_an_error() {
    let t = tempfile::tempdir().unwrap();
    let err = Layer::default()
        .symlink("x", "y")
        .symlink("y", "x")
        .file("x/f", "1")
        .apply(t.path())
        .unwrap_err();
    assert!(err.to_string().contains("too many symlinks"), "{err}");
}

#[test]
fn zstd_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let err = apply_layer(t.path(), &[0x28, 0xb5, 0x2f, 0xfd, 0, 0][..]).unwrap_err();
    assert!(err.to_string().contains("zstd"), "{err}");
}
