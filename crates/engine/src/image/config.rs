//! The image config's runtime defaults (env, working dir, user,
//! entrypoint/cmd), kept so execs in a sandbox from the image start the way
//! the image's author meant. The image's CMD is never run by itself: lohar is
//! PID 1, and the command line is only a default for execs.

use serde::{Deserialize, Serialize};

use super::ImageError;

/// The runtime defaults recorded from an OCI image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=value` strings, in the image's order.
    #[serde(default)]
    pub env: Vec<String>,
    /// The working directory for execs; `None` means `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`; `None` means root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The entrypoint; empty if the image has none.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// The default arguments (to the entrypoint, or the command itself).
    #[serde(default)]
    pub cmd: Vec<String>,
    /// The image's platform, e.g. `linux`/`amd64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// The image's CPU architecture (`amd64`, `arm64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

/// The OCI image config JSON, only the fields we keep.
#[derive(Deserialize)]
struct OciConfigFile {
    #[serde(default)]
    config: Option<OciRuntime>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    architecture: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct OciRuntime {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
}

impl ImageConfig {
    /// Parses an OCI (or docker v2) image config JSON blob.
    pub fn from_oci_json(json: &[u8]) -> Result<Self, ImageError> {
        let file: OciConfigFile =
            serde_json::from_slice(json).map_err(|e| ImageError::Config(e.to_string()))?;
        let rt = file.config.unwrap_or(OciRuntime {
            env: None,
            working_dir: None,
            user: None,
            entrypoint: None,
            cmd: None,
        });
        let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
        Ok(Self {
            env: rt.env.unwrap_or_default(),
            working_dir: non_empty(rt.working_dir),
            user: non_empty(rt.user),
            entrypoint: rt.entrypoint.unwrap_or_default(),
            cmd: rt.cmd.unwrap_or_default(),
            os: non_empty(file.os),
            architecture: non_empty(file.architecture),
        })
    }

    /// The environment as `(key, value)` pairs; entries without `=` get an
    /// empty value.
    pub fn env_pairs(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (e.clone(), String::new()),
            })
            .collect()
    }

    /// The default command line: entrypoint followed by cmd.
    pub fn command(&self) -> Vec<String> {
        self.entrypoint.iter().chain(&self.cmd).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_runtime_fields() {
        let json = br#"{"architecture":"amd64","os":"linux",
            "config":{"Env":["PATH=/usr/bin","EMPTY=","BARE"],"WorkingDir":"/app",
            "User":"1000:1000","Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],
            "ExposedPorts":{"80/tcp":{}}},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let c = ImageConfig::from_oci_json(json).unwrap();
        assert_eq!(c.working_dir.as_deref(), Some("/app"));
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.command(), ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(c.architecture.as_deref(), Some("amd64"));
        assert_eq!(
            c.env_pairs(),
            [
                ("PATH".into(), "/usr/bin".into()),
                ("EMPTY".into(), String::new()),
                ("BARE".into(), String::new())
            ]
        );
    }

    #[test]
    fn a_config_without_runtime_section_is_empty_and_junk_is_an_error() {
        let c = ImageConfig::from_oci_json(br#"{"config":{"WorkingDir":"","Cmd":null}}"#).unwrap();
        assert_eq!(c, ImageConfig::default());
        assert!(matches!(
            ImageConfig::from_oci_json(b"not json"),
            Err(ImageError::Config(_))
        ));
    }
}
