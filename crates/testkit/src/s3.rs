//! A real S3-compatible server for backup tests: `moto` (PyPI `moto[server]`,
//! scripts/install-deps.sh installs it) on a free 127.0.0.1 port, killed by
//! its pid and reaped when dropped, also when the test fails.
//!
//! The server checks SigV4 signatures: it starts with
//! `INITIAL_NO_AUTH_ACTION_COUNT=3`, and the three unauthenticated actions
//! create an IAM user, its access key and an `s3:*` policy (boto3, which moto
//! depends on). Everything after that, the bucket's creation included, must
//! be signed with that key, so a test can check what wrong credentials do.
//! (One bug of moto's signature check is patched at start, see [`SERVER`].)

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs moto's server with one fix: its signature check rebuilds the
/// request from a URI whose query is already percent-decoded, so any signed
/// request with a `/` in a query value (`?prefix=a/b/`, every listing of a
/// "directory") fails with SignatureDoesNotMatch, boto3's own included.
/// Re-encoding the query as SigV4 does makes the check exact again.
const SERVER: &str = r#"
import sys
from urllib.parse import urlsplit, parse_qsl, quote
import moto.iam.access_control as ac
_orig = ac.IAMRequestBase._create_aws_request
def _fixed(self):
    p = urlsplit(self._path)
    if p.query:
        enc = lambda s: quote(s, safe="-_.~")
        q = "&".join(enc(k) + "=" + enc(v) for k, v in parse_qsl(p.query, keep_blank_values=True))
        self._path = p.path + "?" + q
    return _orig(self)
ac.IAMRequestBase._create_aws_request = _fixed
from moto.server import main
main(sys.argv[1:])
"#;

/// Creates the IAM user, key and policy, then the bucket with that key;
/// prints `<access key id> <secret>`.
const SETUP: &str = r#"
import json, sys, boto3
from botocore.config import Config
ep, bucket = sys.argv[1], sys.argv[2]
anon = dict(endpoint_url=ep, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **anon)
iam.create_user(UserName="bhatti")
k = iam.create_access_key(UserName="bhatti")["AccessKey"]
iam.put_user_policy(UserName="bhatti", PolicyName="s3", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1", aws_access_key_id=k["AccessKeyId"],
    aws_secret_access_key=k["SecretAccessKey"], config=Config(s3={"addressing_style": "path"}))
s3.create_bucket(Bucket=bucket)
print(k["AccessKeyId"], k["SecretAccessKey"])
"#;

/// Lists the bucket's unfinished multipart uploads, one key a line.
const UPLOADS: &str = r#"
import sys, boto3
from botocore.config import Config
ep, bucket, key, secret = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1", aws_access_key_id=key,
    aws_secret_access_key=secret, config=Config(s3={"addressing_style": "path"}))
for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
    print(u["Key"])
"#;

/// The Python interpreter's real path. `python3` may be a wrapper script
/// (pyenv's shim) whose pid is not the server's, and a kill must reach the
/// server itself.
fn python() -> Option<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, moto.server, boto3; print(sys.executable)",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let exe = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !exe.is_empty()).then_some(exe)
}

/// Why an S3 test cannot run here (moto or boto3 missing), if it cannot.
pub fn missing() -> Option<&'static str> {
    python()
        .is_none()
        .then_some("python3 with moto[server] (scripts/install-deps.sh installs it)")
}

/// A moto server with one bucket and one access key allowed on it.
pub struct S3Server {
    child: Child,
    python: String,
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    /// Starts one on a free loopback port and sets up `bucket`; panics
    /// (with the server's output) when that fails.
    pub fn start(bucket: &str) -> S3Server {
        let python = python().expect("python3 with moto[server] and boto3");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(&python)
            .args(["-c", SERVER, "-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moto.server");
        let mut s = S3Server {
            child,
            python,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: bucket.to_string(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("moto.server exited before listening: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "moto.server did not listen on {port} in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = Command::new(&s.python)
            .args(["-c", SETUP, &s.endpoint, bucket])
            .output()
            .expect("run the moto setup script");
        assert!(
            out.status.success(),
            "moto setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace();
        s.access_key_id = it.next().expect("access key id").to_string();
        s.secret_access_key = it.next().expect("secret").to_string();
        s
    }

    /// Keys of the bucket's multipart uploads that were neither completed
    /// nor aborted.
    pub fn pending_uploads(&self) -> Vec<String> {
        let out = Command::new(&self.python)
            .args([
                "-c",
                UPLOADS,
                &self.endpoint,
                &self.bucket,
                &self.access_key_id,
                &self.secret_access_key,
            ])
            .output()
            .expect("run the upload listing");
        assert!(
            out.status.success(),
            "listing multipart uploads failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}
