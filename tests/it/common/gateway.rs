//! The gateway under test: options, start and stop, and what tests ask of it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use portcullis::mock_router::{MockOptions, MockRouter};
use tokio::net::TcpStream;

/// A port nothing listens on right now (bind, read, release).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Where the router is, from the gateway's point of view.
pub enum RouterMode {
    Up(MockOptions),
    /// Nothing listens on the router's address.
    Down,
}

pub struct Options {
    pub router: RouterMode,
    pub read_timeout_ms: u64,
    /// Fetch the JWT keys from this URL instead of the jwks.json file.
    pub jwks_url: Option<String>,
    /// Signing material to use instead of freshly generated keys.
    pub keys: Option<Keys>,
    /// Deep-merged over the generated gateway.toml: a table in both is
    /// merged, any other value replaced. Build it with `toml::toml!` and
    /// [`set`] for computed values.
    pub config: toml::Table,
    /// Write the gateway's stdout (logs at `info`) to `gateway.log` in its
    /// dir, and its stderr to `gateway.stderr`.
    pub capture_logs: bool,
    /// Add a TLS listener with this `client_cert` mode, on a dev PKI
    /// generated into the gateway's dir by `portcullis certs dev`.
    pub tls: Option<&'static str>,
    /// Files written into the gateway's dir before it starts.
    pub files: Vec<(&'static str, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            router: RouterMode::Up(MockOptions::default()),
            read_timeout_ms: 5000,
            jwks_url: None,
            keys: None,
            config: toml::Table::new(),
            capture_logs: false,
            tls: None,
            files: Vec::new(),
        }
    }
}

/// `table` with `dotted` (such as `"upstream.address"`) set to `value`,
/// creating the tables on the way.
pub fn set(mut table: toml::Table, dotted: &str, value: impl Into<toml::Value>) -> toml::Table {
    let mut keys: Vec<&str> = dotted.split('.').collect();
    let last = keys.pop().expect("a key");
    let mut at = &mut table;
    for k in keys {
        at = at
            .entry(k)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("a table on the way");
    }
    at.insert(last.into(), value.into());
    table
}

/// Merges `over` into `base`: tables in both merge, anything else is
/// replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// A running gateway; killed on drop.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub router: Option<MockRouter>,
    pub router_addr: SocketAddr,
    /// The TLS listener, when `Options::tls` asked for one.
    pub tls_addr: Option<SocketAddr>,
    pub keys: Keys,
    pub dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    pub async fn start() -> Gateway {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Gateway {
        let keys = opts.keys.unwrap_or_else(Keys::generate);
        let dir = tempfile::tempdir().unwrap();
        let (router, router_addr) = match opts.router {
            RouterMode::Up(o) => {
                let r = MockRouter::start("127.0.0.1:0", o).await.unwrap();
                let a = r.addr();
                (Some(r), a)
            }
            RouterMode::Down => (None, format!("127.0.0.1:{}", free_port()).parse().unwrap()),
        };
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let d = dir.path();
        std::fs::write(d.join("jwks.json"), keys.jwks.to_string()).unwrap();
        std::fs::write(d.join("tenants.toml"), tenants_toml(&keys)).unwrap();
        std::fs::write(d.join("context.key"), hex::encode(&keys.context_key)).unwrap();
        for (name, text) in &opts.files {
            std::fs::write(d.join(name), text).unwrap();
        }
        let tls_addr: Option<SocketAddr> = opts
            .tls
            .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap());
        let tls_table = match (opts.tls, tls_addr) {
            (Some(mode), Some(a)) => {
                dev_pki(d, &d.join("tenants.toml"));
                format!(
                    "[server.tls]\nlisten = [\"{a}\"]\ncert = \"gateway.crt\"\nkey = \"gateway.key\"\n\
                     client_ca = \"ca.crt\"\nclient_cert = \"{mode}\"\n"
                )
            }
            _ => String::new(),
        };
        let jwks_line = match &opts.jwks_url {
            Some(url) => format!("jwks_url = \"{url}\""),
            None => "jwks_file = \"jwks.json\"".into(),
        };
        let base = format!(
            r#"
[server]
listen = ["{addr}"]
threads = 1
region = "us-east-1"
grace_period_seconds = 1
graceful_shutdown_timeout_seconds = 1
pid_file = "{dir}/portcullis.pid"
upgrade_sock = "{dir}/upgrade.sock"

{tls_table}
[admin]
listen = "{admin}"

[upstream]
address = "{router_addr}"
connect_timeout_ms = 500
read_timeout_ms = {read_timeout}

[auth.jwt]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
{jwks_line}
tenant_claim = "tenant"
leeway_seconds = 30

[policy]
tenants = "tenants.toml"

[context]
signing_key_file = "context.key"
"#,
            dir = d.display(),
            read_timeout = opts.read_timeout_ms,
        );
        let mut config: toml::Table = base.parse().expect("the harness's own gateway.toml");
        merge(&mut config, opts.config);
        let gateway_toml = toml::to_string(&config).expect("serialise gateway.toml");
        std::fs::write(d.join("gateway.toml"), gateway_toml).unwrap();

        let (level, stdout, stderr) = if opts.capture_logs {
            let log = std::fs::File::create(d.join("gateway.log")).unwrap();
            let err = std::fs::File::create(d.join("gateway.stderr")).unwrap();
            ("info", Stdio::from(log), Stdio::from(err))
        } else {
            ("warn", Stdio::null(), Stdio::inherit())
        };
        let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["serve", "-c"])
            .arg(d.join("gateway.toml"))
            .env("PORTCULLIS_LOG", level)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("start the gateway binary");
        let gw = Gateway {
            child,
            addr,
            admin,
            router,
            router_addr,
            tls_addr,
            keys,
            dir,
        };
        gw.wait_ready().await;
        gw
    }

    /// Ready: both listeners accept (Pingora starts the plaintext and the
    /// TLS service separately, in either order) and the admin port answers.
    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let tls_up = match self.tls_addr {
                Some(a) => TcpStream::connect(a).await.is_ok(),
                None => true,
            };
            if tls_up && TcpStream::connect(self.addr).await.is_ok() {
                if let Ok(r) = send(self.admin, &get("/healthz").build()).await {
                    if r.status == 200 {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("gateway did not become ready on {}", self.addr);
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the gateway process has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().is_ok_and(|s| s.is_some())
    }

    /// Sends SIGTERM and waits (up to 15 s) for the process to exit.
    pub async fn terminate(&mut self) {
        std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.exited() {
            assert!(Instant::now() < deadline, "the gateway did not stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The mock router (panics for a `Down` router).
    pub fn router(&self) -> &MockRouter {
        self.router.as_ref().expect("router is up")
    }

    /// How many requests the router has seen.
    pub fn router_count(&self) -> usize {
        self.router.as_ref().map_or(0, |r| r.requests().len())
    }

    pub async fn send(&self, req: &[u8]) -> Response {
        send(self.addr, req).await.expect("gateway answers")
    }
}

/// Asserts a gateway rejection: status, code, JSON content type, and that
/// the router received nothing.
pub fn assert_rejected(gw: &Gateway, r: &Response, status: u16, code: &str) {
    assert_eq!(
        r.status,
        status,
        "body: {}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.code(), code, "body: {}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/json"));
    if status == 401 {
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer error=\"invalid_token\"")
        );
    }
    assert_eq!(
        gw.router_count(),
        0,
        "a rejected request reached the router"
    );
}

/// The context headers every forwarded request carries, in signed order.
pub const CONTEXT_HEADERS: [&str; 6] = [
    "x-request-id",
    "x-tenant-id",
    "x-tenant-limits",
    "x-tenant-model",
    "x-tenant-org",
    "x-tenant-plan",
];

/// Recomputes `x-tenant-signature` independently, as a router would.
/// `names` are the signed headers expected in `h`, in order.
pub fn verify_signature(
    key: &[u8],
    method: &str,
    path: &str,
    rec: &portcullis::mock_router::Recorded,
    names: &[&str],
) {
    let sig = rec.header("x-tenant-signature").expect("signature header");
    let parts: std::collections::HashMap<&str, &str> =
        sig.split(',').filter_map(|p| p.split_once('=')).collect();
    let t: u64 = parts["t"].parse().unwrap();
    assert!(t.abs_diff(now()) < 60, "timestamp is current");
    let signed: Vec<&str> = parts["h"].split(';').collect();
    assert_eq!(signed, names);
    let mut canonical = format!("portcullis-context-v1\n{t}\n{method}\n{path}\n");
    for n in names {
        canonical.push_str(&format!("{n}:{}\n", rec.header(n).unwrap()));
    }
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(key).unwrap();
    hmac::Mac::update(&mut mac, canonical.as_bytes());
    assert_eq!(
        parts["v1"],
        hex::encode(hmac::Mac::finalize(mac).into_bytes())
    );
}

/// The JSON log lines of `target` (`access`, `guardrails`) once `n` have
/// been written (the gateway must capture its logs).
pub async fn log_lines(gw: &Gateway, target: &str, n: usize) -> Vec<serde_json::Value> {
    let read = || {
        std::fs::read_to_string(gw.dir.path().join("gateway.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == target)
            .collect::<Vec<_>>()
    };
    for _ in 0..100 {
        let lines = read();
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} {target} lines: {:?}", read());
}

/// The value of the first metric line starting with `line_prefix` (0 when
/// the series does not exist yet).
pub async fn metric(gw: &Gateway, line_prefix: &str) -> u64 {
    metric_f64(gw, line_prefix).await as u64
}

/// The same for a series with a fractional value (a cost).
pub async fn metric_f64(gw: &Gateway, line_prefix: &str) -> f64 {
    let r = send(gw.admin, &get("/metrics").build()).await.unwrap();
    String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
