//! Running nft, conntrack and the forwarding switch, on the host or inside
//! a named network namespace (`ip netns exec <ns> …`).

use std::net::Ipv4Addr;
use std::process::Stdio;

use super::render::TABLE;

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The program could not be started (missing, no permission).
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// It ran and failed; `stderr` is what it said (for nft, the offending
    /// line of the document with a marker).
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        code: Option<i32>,
        stderr: String,
    },
}

/// What a finished command printed.
struct Output {
    command: String,
    code: Option<i32>,
    status: String,
    stderr: String,
}

/// Applies nft documents and related host settings, in one network
/// namespace or (None) in the daemon's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firewall {
    netns: Option<String>,
}

impl Firewall {
    pub fn new(netns: Option<String>) -> Firewall {
        Firewall { netns }
    }

    /// The namespace this firewall acts in.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Runs `nft -f -` with `doc` on stdin: one atomic transaction.
    pub async fn apply(&self, doc: &str) -> Result<(), FirewallError> {
        check(self.exec("nft", &["-f", "-"], Some(doc)).await?)
    }

    /// Deletes conntrack entries from or to this address (`conntrack -D -s
    /// ip` and `-d ip`), so established flows meet new rules. Finding
    /// nothing is success.
    pub async fn flush_conntrack(&self, ip: Ipv4Addr) -> Result<(), FirewallError> {
        let ip = ip.to_string();
        // Both directions at once: each is a process of its own (~12 ms).
        let (src, dst) = (["-D", "-s", ip.as_str()], ["-D", "-d", ip.as_str()]);
        let (from, to) = tokio::join!(
            self.exec("conntrack", &src, None),
            self.exec("conntrack", &dst, None)
        );
        for out in [from?, to?] {
            // conntrack exits 1 with "0 flow entries have been deleted."
            // when nothing matched.
            let nothing = out.code == Some(1) && out.stderr.contains(" 0 flow entries");
            if !nothing {
                check(out)?;
            }
        }
        Ok(())
    }

    /// Turns on IPv4 forwarding (net.ipv4.ip_forward=1) in the namespace.
    pub async fn enable_forwarding(&self) -> Result<(), FirewallError> {
        const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
        match &self.netns {
            // /proc/sys/net shows the reading process's namespace, so the
            // write must happen inside it.
            Some(_) => {
                let script = format!("echo 1 > {PATH}");
                let out = self.exec("sh", &["-c", &script], None).await?;
                check(out)
            }
            None => tokio::fs::write(PATH, "1\n")
                .await
                .map_err(|source| FirewallError::Spawn {
                    command: format!("write 1 to {PATH}"),
                    source,
                }),
        }
    }

    /// Removes bhatti's tables; missing ones are fine.
    pub async fn remove_all(&self) -> Result<(), FirewallError> {
        let doc = format!(
            "table inet {TABLE}\ndelete table inet {TABLE}\n\
             table bridge {TABLE}\ndelete table bridge {TABLE}\n"
        );
        self.apply(&doc).await
    }

    /// The full command line, for messages.
    fn command_line(&self, program: &str, args: &[&str]) -> String {
        let mut parts: Vec<&str> = Vec::new();
        if let Some(ns) = &self.netns {
            parts.extend(["ip", "netns", "exec", ns.as_str()]);
        }
        parts.push(program);
        parts.extend_from_slice(args);
        parts.join(" ")
    }

    /// Runs `program args…` (inside the namespace), feeding `stdin`.
    async fn exec(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Output, FirewallError> {
        let command = self.command_line(program, args);
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns.as_str(), program]);
                c
            }
            None => tokio::process::Command::new(program),
        };
        cmd.args(args);
        let spawn_err = |source| FirewallError::Spawn {
            command: command.clone(),
            source,
        };
        let out = match stdin {
            Some(doc) => crate::cmd::output_with_input(cmd, doc).await,
            None => {
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true);
                cmd.output().await
            }
        }
        .map_err(spawn_err)?;
        let result = Output {
            command: command.clone(),
            code: out.status.code(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        };
        Ok(result)
    }
}

fn check(out: Output) -> Result<(), FirewallError> {
    if out.code == Some(0) {
        return Ok(());
    }
    Err(FirewallError::Failed {
        command: out.command,
        status: out.status,
        code: out.code,
        stderr: out.stderr,
    })
}
