//! A real S3-compatible server for the tiered-storage tests: moto's server mode, from the
//! venv `tests/run` installs (`S3_SERVER_VENV`; pinned in `tests/s3/requirements.txt`), on a
//! free loopback port. Dropping it kills the process.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_store::RemoteOptions;
use tokio::time::Instant;

/// A running S3 server on loopback.
pub struct S3Server {
    child: Child,
    /// Its address, `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

/// Test credentials (the server accepts any). The nodes' S3 client reads them from the
/// environment, as a node does in production: set once, before any node starts, and never
/// changed, so no thread reads the environment while it is written.
fn set_credentials() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (key, value) in [
            ("AWS_ACCESS_KEY_ID", "ferry-test"),
            ("AWS_SECRET_ACCESS_KEY", "ferry-test"),
            ("AWS_REGION", "us-east-1"),
            // Loopback never through a proxy (reqwest honours these).
            ("NO_PROXY", "127.0.0.1,localhost,::1"),
            ("no_proxy", "127.0.0.1,localhost,::1"),
        ] {
            std::env::set_var(key, value);
        }
    });
}

impl S3Server {
    /// Starts the server and waits (bounded) until it answers.
    pub async fn start() -> Self {
        set_credentials();
        let venv = std::env::var("S3_SERVER_VENV").expect(
            "S3_SERVER_VENV names the Python venv holding moto (tests/run makes it: \
             deploy/examples/order-processor/setup-venv target/s3-venv tests/s3/requirements.txt)",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(format!("{venv}/bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let deadline = Instant::now() + Duration::from_secs(60);
        while http.get(&server.endpoint).send().await.is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }

    /// Creates bucket `name`.
    pub async fn create_bucket(&self, name: &str) {
        let answer = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
            .put(format!("{}/{name}", self.endpoint))
            .send()
            .await
            .expect("bucket creation answered");
        assert!(
            answer.status().is_success(),
            "creating bucket {name}: {}",
            answer.status()
        );
    }

    /// Options for a node storing under `s3://bucket/prefix` on this server.
    pub fn options(&self, bucket: &str, prefix: &str) -> RemoteOptions {
        RemoteOptions {
            endpoint: Some(self.endpoint.clone()),
            allow_http: true,
            request_timeout_ms: 2_000,
            upload_interval_ms: 200,
            max_upload_backoff_ms: 2_000,
            sweep_interval_ms: 5_000,
            ..RemoteOptions::new(format!("s3://{bucket}/{prefix}"))
        }
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill only sends a signal to the server process this value owns.
        let sent = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(sent, 0, "signalling moto_server");
    }

    /// Stops the server where it stands (SIGSTOP): connections hang and requests time out,
    /// as with a store that is down; what it holds stays.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused server go on (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
