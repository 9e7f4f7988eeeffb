//! Running host tools (`ip`, `mkfs.*`, `mount`, `resize2fs`) with errors
//! that say which command failed and what it printed.

use std::ffi::OsStr;
use std::process::Stdio;

/// A host command that could not be run or exited non-zero.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {message}")]
pub struct CmdError {
    /// The command line, for the message.
    pub command: String,
    /// Its stderr (trimmed), or why it could not start.
    pub message: String,
    /// The exit code, if it ran and exited.
    pub code: Option<i32>,
}

/// Runs `program args…` to completion; returns its stdout.
pub async fn run<I, S>(program: &str, args: I) -> Result<String, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let command = std::iter::once(program.to_owned())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = tokio::process::Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| CmdError {
            command: command.clone(),
            message: e.to_string(),
            code: None,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        return Err(CmdError {
            command,
            message: if stderr.is_empty() {
                format!("{} {stdout}", out.status)
            } else {
                stderr
            },
            code: out.status.code(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a prepared command to completion, feeding it `input` on stdin
/// (written while it runs: input larger than the pipe buffer would
/// otherwise deadlock against the command's own output). stdout and stderr
/// are captured. A failed write is reported only if the command succeeded
/// (a tool stops reading at its first error, and its stderr says why).
pub async fn output_with_input(
    mut cmd: tokio::process::Command,
    input: &str,
) -> std::io::Result<std::process::Output> {
    use tokio::io::AsyncWriteExt;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let pipe = child.stdin.take();
    let write = async move {
        match pipe {
            Some(mut p) => {
                p.write_all(input.as_bytes()).await?;
                p.shutdown().await
            }
            None => Ok(()),
        }
    };
    let (written, out) = tokio::join!(write, child.wait_with_output());
    let out = out?;
    if let Err(e) = written {
        if out.status.success() {
            return Err(e);
        }
    }
    Ok(out)
}
