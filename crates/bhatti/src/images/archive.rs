//! Image tarballs as `skopeo copy … docker-archive:x.tar` / `oci-archive:x.tar`
//! and `docker save` make: extracted (regular files and directories only,
//! every path kept inside the work dir), then read as an OCI layout
//! (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`) or a docker archive
//! (`manifest.json` naming a config file and layer files). Layers may be
//! plain or gzip tars; the unpacker sniffs which. Blocking.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::image::ImageConfig;

/// What an archive holds, ready to unpack.
#[derive(Debug)]
pub struct Archive {
    pub config: ImageConfig,
    /// The layer files, bottom first.
    pub layers: Vec<PathBuf>,
    /// The manifest's digest (OCI) or the config's (docker).
    pub digest: Option<String>,
}

/// Why an archive cannot be imported (a 400: it is the caller's file).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ArchiveError(pub String);

fn bad(m: impl Into<String>) -> ArchiveError {
    ArchiveError(m.into())
}

/// Extracts `tarball` into `dir` (created) and reads it.
pub fn open(tarball: &Path, dir: &Path) -> Result<Archive, ArchiveError> {
    let links = extract(tarball, dir)?;
    let tree = Tree { dir, links };
    if tree.file("oci-layout").is_some() || tree.file("index.json").is_some() {
        if let Some(index) = tree.file("index.json") {
            return read_oci(&tree, &index);
        }
    }
    if let Some(manifest) = tree.file("manifest.json") {
        return read_docker(&tree, &manifest);
    }
    Err(bad(
        "not an image archive: it has neither index.json (OCI layout) nor manifest.json (docker-archive)",
    ))
}

/// The extracted tree, with the archive's symlinks (docker's layer
/// dedup) resolved lexically inside it.
struct Tree<'a> {
    dir: &'a Path,
    links: HashMap<PathBuf, PathBuf>,
}

impl Tree<'_> {
    /// A regular file by its path in the archive.
    fn file(&self, rel: &str) -> Option<PathBuf> {
        let mut rel = clean(Path::new(rel))?;
        for _ in 0..8 {
            let p = self.dir.join(&rel);
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) {
                return Some(p);
            }
            let target = self.links.get(&rel)?;
            let base = rel.parent().unwrap_or(Path::new(""));
            rel = clean(&base.join(target))?;
        }
        None
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        path: &Path,
        what: &str,
    ) -> Result<T, ArchiveError> {
        let bytes = std::fs::read(path).map_err(|e| bad(format!("reading {what}: {e}")))?;
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("{what} is not valid: {e}")))
    }

    fn blob(&self, digest: &str) -> Result<PathBuf, ArchiveError> {
        let (alg, hex) = digest
            .split_once(':')
            .filter(|(a, h)| {
                !a.is_empty() && !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric())
            })
            .ok_or_else(|| bad(format!("bad digest {digest:?}")))?;
        self.file(&format!("blobs/{alg}/{hex}"))
            .ok_or_else(|| bad(format!("blob {digest} is missing from the archive")))
    }
}

/// A relative path without `..` escaping or root parts; `None` if it would
/// leave the archive.
fn clean(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

fn extract(tarball: &Path, dir: &Path) -> Result<HashMap<PathBuf, PathBuf>, ArchiveError> {
    let io = |what: &str, e: std::io::Error| bad(format!("{what}: {e}"));
    std::fs::create_dir_all(dir).map_err(|e| io("creating the work dir", e))?;
    let f = std::fs::File::open(tarball).map_err(|e| io("opening the upload", e))?;
    let mut ar = tar::Archive::new(std::io::BufReader::new(f));
    let mut links = HashMap::new();
    let entries = ar.entries().map_err(|e| io("reading the tarball", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| io("reading the tarball", e))?;
        let path = entry
            .path()
            .map_err(|e| io("reading the tarball", e))?
            .into_owned();
        let Some(rel) = clean(&path) else { continue };
        let kind = entry.header().entry_type();
        let dest = dir.join(&rel);
        if kind.is_dir() {
            std::fs::create_dir_all(&dest).map_err(|e| io("extracting", e))?;
        } else if kind.is_file() {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io("extracting", e))?;
            }
            // A later entry of the same path replaces the earlier one.
            let _ = std::fs::remove_file(&dest);
            let mut out = std::fs::File::create(&dest).map_err(|e| io("extracting", e))?;
            std::io::copy(&mut entry, &mut out).map_err(|e| io("extracting", e))?;
        } else if kind.is_symlink() || kind.is_hard_link() {
            if let Ok(Some(target)) = entry.link_name() {
                let target = target.into_owned();
                let target = if kind.is_hard_link() {
                    // Hard link names are archive paths, not relative ones.
                    let up = rel.components().count().saturating_sub(1);
                    let mut t = PathBuf::new();
                    for _ in 0..up {
                        t.push("..");
                    }
                    t.join(target)
                } else {
                    target
                };
                links.insert(rel, target);
            }
        }
    }
    Ok(links)
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn is_index(media_type: &str) -> bool {
    media_type.contains("image.index") || media_type.contains("manifest.list")
}

/// The host platform's manifest of an index (or the only one).
fn pick(manifests: Vec<Descriptor>) -> Result<Descriptor, ArchiveError> {
    let n = manifests.len();
    let mut it = manifests.into_iter();
    if n == 1 {
        return it.next().ok_or_else(|| bad("index.json lists no image"));
    }
    it.find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == host_arch())
    })
    .ok_or_else(|| {
        bad(format!(
            "the archive has {n} images and none for linux/{}",
            host_arch()
        ))
    })
}

fn read_oci(tree: &Tree<'_>, index: &Path) -> Result<Archive, ArchiveError> {
    let index: Index = tree.json(index, "index.json")?;
    let mut desc = pick(index.manifests)?;
    // A nested index (multi-platform image): one more level.
    for _ in 0..2 {
        if !is_index(&desc.media_type) {
            break;
        }
        let nested: Index = tree.json(&tree.blob(&desc.digest)?, "a nested index")?;
        desc = pick(nested.manifests)?;
    }
    let manifest: Manifest = tree.json(&tree.blob(&desc.digest)?, "the image manifest")?;
    let config_bytes = std::fs::read(tree.blob(&manifest.config.digest)?)
        .map_err(|e| bad(format!("reading the image config: {e}")))?;
    let config = ImageConfig::from_oci_json(&config_bytes).map_err(|e| bad(e.to_string()))?;
    let layers = manifest
        .layers
        .iter()
        .map(|l| tree.blob(&l.digest))
        .collect::<Result<_, _>>()?;
    Ok(Archive {
        config,
        layers,
        digest: Some(desc.digest),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    layers: Vec<String>,
}

fn read_docker(tree: &Tree<'_>, manifest: &Path) -> Result<Archive, ArchiveError> {
    let entries: Vec<DockerEntry> = tree.json(manifest, "manifest.json")?;
    let n = entries.len();
    let Some(entry) = entries.into_iter().next() else {
        return Err(bad("manifest.json lists no image"));
    };
    if n > 1 {
        return Err(bad(format!(
            "manifest.json lists {n} images; import one at a time"
        )));
    }
    let config_path = tree
        .file(&entry.config)
        .ok_or_else(|| bad(format!("the config {} is missing", entry.config)))?;
    let config_bytes =
        std::fs::read(&config_path).map_err(|e| bad(format!("reading the image config: {e}")))?;
    let config = ImageConfig::from_oci_json(&config_bytes).map_err(|e| bad(e.to_string()))?;
    let layers = entry
        .layers
        .iter()
        .map(|l| {
            tree.file(l)
                .ok_or_else(|| bad(format!("the layer {l} is missing")))
        })
        .collect::<Result<_, _>>()?;
    use sha2::Digest as _;
    let digest = format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(&config_bytes))
    );
    Ok(Archive {
        config,
        layers,
        digest: Some(digest),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])], links: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (p, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            // Raw names, `..` included (the builder would refuse those).
            let name = &mut h.as_old_mut().name;
            name[..p.len()].copy_from_slice(p.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        for (p, target) in links {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, p, target).unwrap();
        }
        b.into_inner().unwrap()
    }

    const CONFIG: &[u8] = br#"{"config":{"Env":["A=1"],"WorkingDir":"/w"}}"#;

    #[test]
    fn reads_docker_archives_with_linked_layers() {
        let layer = tar_of(&[("etc/x", b"x")], &[]);
        let manifest =
            br#"[{"Config":"c.json","RepoTags":["x:1"],"Layers":["l1/layer.tar","l2/layer.tar"]}]"#;
        let t = tempfile::tempdir().unwrap();
        let ball = t.path().join("a.tar");
        std::fs::write(
            &ball,
            tar_of(
                &[
                    ("manifest.json", manifest),
                    ("c.json", CONFIG),
                    ("l1/layer.tar", &layer),
                    ("../evil", b"no"),
                ],
                &[("l2/layer.tar", "../l1/layer.tar")],
            ),
        )
        .unwrap();
        let a = open(&ball, &t.path().join("x")).unwrap();
        assert_eq!(a.config.working_dir.as_deref(), Some("/w"));
        assert_eq!(a.layers.len(), 2);
        assert_eq!(a.layers[0], a.layers[1]);
        assert!(a.digest.unwrap().starts_with("sha256:"));
        assert!(!t.path().join("evil").exists());
    }

    #[test]
    fn reads_oci_layouts_and_refuses_junk() {
        use sha2::Digest as _;
        let sha = |b: &[u8]| hex::encode(sha2::Sha256::digest(b));
        let layer = tar_of(&[("etc/x", b"x")], &[]);
        let manifest = format!(
            r#"{{"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}"}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{}"}}]}}"#,
            sha(CONFIG),
            sha(&layer)
        );
        let index = format!(
            r#"{{"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}"}}]}}"#,
            sha(manifest.as_bytes())
        );
        let t = tempfile::tempdir().unwrap();
        let ball = t.path().join("a.tar");
        let paths = [
            format!("blobs/sha256/{}", sha(CONFIG)),
            format!("blobs/sha256/{}", sha(&layer)),
            format!("blobs/sha256/{}", sha(manifest.as_bytes())),
        ];
        std::fs::write(
            &ball,
            tar_of(
                &[
                    ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
                    ("index.json", index.as_bytes()),
                    (&paths[0], CONFIG),
                    (&paths[1], &layer),
                    (&paths[2], manifest.as_bytes()),
                ],
                &[],
            ),
        )
        .unwrap();
        let a = open(&ball, &t.path().join("x")).unwrap();
        assert_eq!(a.config.env, ["A=1"]);
        assert_eq!(a.layers.len(), 1);
        assert_eq!(
            a.digest,
            Some(format!("sha256:{}", sha(manifest.as_bytes())))
        );

        std::fs::write(&ball, tar_of(&[("hello", b"x")], &[])).unwrap();
        let e = open(&ball, &t.path().join("y")).unwrap_err();
        assert!(e.to_string().contains("not an image archive"), "{e}");
        std::fs::write(&ball, b"not a tar at all, just text").unwrap();
        assert!(open(&ball, &t.path().join("z")).is_err());
    }
}
