//! Integration-test harness: the real `portcullis` binary on ephemeral
//! ports, in front of the recording mock router, driven over raw sockets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use portcullis::dev::DevJwtKey;
use portcullis::identity::api_key;
use portcullis::mock_router::{MockOptions, MockRouter};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const ISSUER: &str = "https://issuer.test";
pub const AUDIENCE: &str = "portcullis-test";

/// A port nothing listens on right now (bind, read, release).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Signing material for every accepted algorithm, plus the JWKS that
/// publishes the public halves. Only RSA is a fixed (TEST-ONLY) fixture.
pub struct Keys {
    pub rsa_private: Vec<u8>,
    pub rsa_public_pem: Vec<u8>,
    pub ec_private: String,
    pub ed_private: String,
    pub hs_secret: Vec<u8>,
    pub jwks: Value,
    pub acme_key: String,
    pub context_key: Vec<u8>,
}

impl Keys {
    pub fn generate() -> Keys {
        let rsa_jwk: Value =
            serde_json::from_slice(&std::fs::read(fixture("TEST-ONLY-rsa-2048.jwk.json")).unwrap())
                .unwrap();
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = ec.public_key_raw(); // 0x04 || x || y
        let ec_jwk = json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "ec-1",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65])});
        let ed = DevJwtKey::generate("ed-1").unwrap();
        let hs_secret: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
        let hs_jwk = json!({"kty": "oct", "alg": "HS256", "kid": "hs-1",
            "k": URL_SAFE_NO_PAD.encode(&hs_secret)});
        Keys {
            rsa_private: std::fs::read(fixture("TEST-ONLY-rsa-2048.pem")).unwrap(),
            rsa_public_pem: std::fs::read(fixture("TEST-ONLY-rsa-2048.pub.pem")).unwrap(),
            ec_private: ec.serialize_pem(),
            ed_private: ed.private_pem,
            hs_secret,
            jwks: json!({"keys": [rsa_jwk, ec_jwk, ed.jwks["keys"][0].clone(), hs_jwk]}),
            acme_key: api_key::generate(),
            context_key: (0..32).map(|_| rand::random::<u8>()).collect(),
        }
    }

    /// Standard claims for `tenant`, valid for an hour.
    pub fn claims(&self, tenant: &str) -> Value {
        json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "tenant": tenant,
               "iat": now(), "exp": now() + 3600})
    }

    /// Signs `claims` with the key for `alg`, under header `kid`.
    pub fn sign(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&self.rsa_private).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(self.ec_private.as_bytes()).unwrap(),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(self.ed_private.as_bytes()).unwrap(),
            Algorithm::HS256 => EncodingKey::from_secret(&self.hs_secret).unwrap(),
            other => panic!("no test key for {other:?}"),
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        encode(&header, claims, &key).unwrap()
    }

    /// A valid RS256 token for `tenant`.
    pub fn token(&self, tenant: &str) -> String {
        self.sign(Algorithm::RS256, Some("rsa-1"), &self.claims(tenant))
    }
}

/// Builds a JWT from raw header and claims JSON with an HMAC signature
/// over `secret`: the tool of an attacker who controls the header.
pub fn forge_hs256(header: &Value, claims: &Value, secret: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let c = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{h}.{c}").as_bytes());
    format!(
        "{h}.{c}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// Plans and tenants the tests rely on.
pub fn tenants_toml(keys: &Keys) -> String {
    format!(
        r#"
[plans.basic]
requests_per_second = 1000
burst = 1000
tokens_per_minute = 1_000_000
tokens_per_day = 10_000_000
max_concurrency = 100
max_body_bytes = 65_536
max_prompt_tokens = 4_096
max_output_tokens = 1_024
models = ["m-small"]
features = ["chat", "embeddings"]
regions = ["us-east-1"]

[plans.gold]
requests_per_second = 1000
burst = 1000
tokens_per_minute = 5_000_000
tokens_per_day = 50_000_000
max_concurrency = 100
max_body_bytes = 1_048_576
max_prompt_tokens = 100_000
max_output_tokens = 8_192
models = ["m-small", "m-large", "m-exp-*"]
features = ["chat", "completions", "embeddings", "stream"]

[plans.eu]
requests_per_second = 1000
burst = 1000
tokens_per_minute = 1_000_000
tokens_per_day = 10_000_000
max_concurrency = 100
max_body_bytes = 65_536
max_prompt_tokens = 4_096
max_output_tokens = 1_024
models = ["m-small"]
features = ["chat"]
regions = ["eu-west-1"]

[[tenants]]
id = "acme"
org = "acme-corp"
plan = "basic"
api_keys = ["{acme_hash}"]
mtls_identities = ["spiffe://tenants/acme"]
[tenants.overrides]
tokens_per_minute = 500_000

[[tenants]]
id = "globex"
org = "globex-inc"
plan = "gold"

[[tenants]]
id = "initech"
org = "initech-llc"
plan = "basic"
suspended = true

[[tenants]]
id = "euro"
org = "euro-gmbh"
plan = "eu"

[plans.big]
requests_per_second = 1000
burst = 1000
tokens_per_minute = 100_000_000
tokens_per_day = 100_000_000
max_concurrency = 100
max_body_bytes = 2_097_152
max_prompt_tokens = 1_000_000
max_output_tokens = 4_096
models = ["m-small"]
features = ["chat", "completions", "embeddings", "stream"]
forbidden_fields = ["logit_bias"]

[plans.tight]
requests_per_second = 1
burst = 3
tokens_per_minute = 1_500
tokens_per_day = 100_000
max_concurrency = 1
max_body_bytes = 65_536
max_prompt_tokens = 4_096
max_output_tokens = 1_000
models = ["m-small"]
features = ["chat", "stream"]

[[tenants]]
id = "tiny"
org = "tiny-co"
plan = "tight"

[[tenants]]
id = "solo"
org = "solo-co"
plan = "tight"
[tenants.overrides]
requests_per_second = 1000
burst = 1000
tokens_per_minute = 1_000_000

[plans.fleet]
requests_per_second = 10
burst = 10
tokens_per_minute = 1_500
tokens_per_day = 100_000
max_concurrency = 100
max_body_bytes = 65_536
max_prompt_tokens = 4_096
max_output_tokens = 1_000
models = ["m-small"]
features = ["chat"]

[[tenants]]
id = "fleet"
org = "fleet-co"
plan = "fleet"

[[tenants]]
id = "swarm"
org = "swarm-co"
plan = "fleet"
[tenants.overrides]
tokens_per_minute = 10_000_000

[[tenants]]
id = "bigco"
org = "big-co"
plan = "big"

[[tenants]]
id = "bound"
org = "bound-co"
plan = "gold"
jwt_subjects = ["svc-1"]
"#,
        acme_hash = api_key::hash_entry(&keys.acme_key)
    )
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
    /// Replaces the `[auth.jwt]` JWKS source line (default: a jwks.json file).
    pub jwks_line: Option<String>,
    /// Extra lines appended to `[auth.jwt]`.
    pub jwt_extra: String,
    /// Replaces the `[upstream]` address line (the mock router is then unused).
    pub upstream_lines: Option<String>,
    /// Signing material to use instead of freshly generated keys.
    pub keys: Option<Keys>,
    /// Extra tables appended to gateway.toml (such as `[body]`).
    pub gateway_extra: String,
    /// Write the gateway's stdout (logs at `info`) to `gateway.log` in its
    /// dir, and its stderr to `gateway.stderr`.
    pub capture_logs: bool,
    /// Add a TLS listener with this `client_cert` mode, on a dev PKI
    /// generated into the gateway's dir by `portcullis certs dev`.
    pub tls: Option<&'static str>,
    /// Extra lines for the `[server.tls]` table (such as `crl = "ca.crl"`).
    pub tls_extra: &'static str,
    /// Extra lines for the `[policy]` table (such as `rego = "..."`).
    pub policy_extra: String,
    /// Files written into the gateway's dir before it starts.
    pub files: Vec<(&'static str, String)>,
    /// Extra lines for the `[server]` table.
    pub server_extra: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            router: RouterMode::Up(MockOptions::default()),
            read_timeout_ms: 5000,
            jwks_line: None,
            jwt_extra: String::new(),
            upstream_lines: None,
            keys: None,
            gateway_extra: String::new(),
            capture_logs: false,
            tls: None,
            tls_extra: "",
            policy_extra: String::new(),
            files: Vec::new(),
            server_extra: "",
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
                     client_ca = \"ca.crt\"\nclient_cert = \"{mode}\"\n{}\n",
                    opts.tls_extra
                )
            }
            _ => String::new(),
        };
        let upstream_lines = opts
            .upstream_lines
            .unwrap_or_else(|| format!("address = \"{router_addr}\""));
        let jwks_line = opts
            .jwks_line
            .unwrap_or_else(|| "jwks_file = \"jwks.json\"".into());
        let gateway_toml = format!(
            r#"
[server]
listen = ["{addr}"]
threads = 1
region = "us-east-1"
grace_period_seconds = 1
{server_extra}
graceful_shutdown_timeout_seconds = 1
pid_file = "{dir}/portcullis.pid"
upgrade_sock = "{dir}/upgrade.sock"

{tls_table}
[admin]
listen = "{admin}"

[upstream]
{upstream_lines}
connect_timeout_ms = 500
read_timeout_ms = {read_timeout}

[auth.jwt]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
{jwks_line}
tenant_claim = "tenant"
leeway_seconds = 30
{jwt_extra}

[policy]
tenants = "tenants.toml"
{policy_extra}

[context]
signing_key_file = "context.key"

{gateway_extra}
"#,
            gateway_extra = opts.gateway_extra,
            policy_extra = opts.policy_extra,
            server_extra = opts.server_extra,
            dir = d.display(),
            read_timeout = opts.read_timeout_ms,
            jwt_extra = opts.jwt_extra,
        );
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

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if TcpStream::connect(self.addr).await.is_ok() {
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

/// A real `redis-server` on a free loopback port, stopped on drop. A
/// missing binary fails the test: `.ci/run` installs it.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub async fn start() -> Redis {
        Self::start_on(free_port()).await
    }

    pub async fn start_on(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is required (apt-get install -y redis-server)");
        let redis = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
                let mut buf = [0u8; 16];
                if s.write_all(b"PING\r\n").await.is_ok()
                    && s.read(&mut buf)
                        .await
                        .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
                {
                    return redis;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not start on port {port}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a dev PKI into `dir` with `portcullis certs dev`, with a client
/// certificate for each tenant in `tenants` that has an mTLS identity.
pub fn dev_pki(dir: &Path, tenants: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["certs", "dev", "--out"])
        .arg(dir)
        .arg("--jwks")
        .arg(dir.join("dev-jwks.json"))
        .arg("--tenants")
        .arg(tenants)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "certs dev: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error.code` of an OpenAI-shaped error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Sends raw bytes and reads the response until the server closes.
pub async fn send(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Response> {
    let io = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(raw).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(15), io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response in 15 s"))??;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(&buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad response: {:?}", String::from_utf8_lossy(&buf)),
            ))
        }
    };
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let mut body = buf[head_len..].to_vec();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(len) = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Ok(Response {
        status: resp.code.unwrap_or(0),
        headers,
        body,
    })
}

/// Reads one Content-Length response from a kept-alive connection;
/// returns its status and whether the server asked to close.
pub async fn read_keep_alive(s: &mut TcpStream) -> Option<(u16, bool)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = resp.parse(&buf) {
            let get = |name: &str| {
                resp.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).to_string())
            };
            let len: usize = get("content-length")?.trim().parse().ok()?;
            let close = get("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
            let status = resp.code?;
            while buf.len() < head + len {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some((status, close));
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn dechunk(mut raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunked body");
    let mut out = Vec::new();
    loop {
        let (used, size) = match httparse::parse_chunk_size(raw) {
            Ok(httparse::Status::Complete(c)) => c,
            _ => return Err(bad()),
        };
        let size = size as usize;
        raw = &raw[used..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            return Err(bad());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// A raw HTTP/1.1 request builder; headers go out exactly as given.
pub struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

pub fn get(path: &str) -> Req {
    Req {
        method: "GET".into(),
        path: path.into(),
        headers: vec![],
        body: vec![],
    }
}

pub fn post(path: &str, body: &Value) -> Req {
    post_raw(path, body.to_string().into_bytes())
}

/// A POST of exactly these bytes, as application/json.
pub fn post_raw(path: &str, body: Vec<u8>) -> Req {
    Req {
        method: "POST".into(),
        path: path.into(),
        headers: vec![("Content-Type".into(), "application/json".into())],
        body,
    }
}

/// A small valid chat request.
pub fn chat_body() -> Value {
    json!({"model": "m-small", "messages": [{"role": "user", "content": "Hello"}]})
}

impl Req {
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Replaces the default Content-Type (or drops it with `None`).
    pub fn content_type(mut self, value: Option<&str>) -> Req {
        self.headers
            .retain(|(n, _)| !n.eq_ignore_ascii_case("content-type"));
        if let Some(v) = value {
            self.headers.push(("Content-Type".into(), v.into()));
        }
        self
    }

    pub fn bearer(self, token: &str) -> Req {
        self.header("Authorization", &format!("Bearer {token}"))
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n",
            self.method, self.path
        );
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        if self.method != "GET" {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }

    /// The request without the automatic Content-Length, for framing tests.
    pub fn build_raw_head(&self, extra_head: &str) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n",
            self.method, self.path
        );
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str(extra_head);
        out.push_str("\r\n");
        out.into_bytes()
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

/// The value of the first metric line starting with `line_prefix` (0 when
/// the series does not exist yet).
pub async fn metric(gw: &Gateway, line_prefix: &str) -> u64 {
    let r = send(gw.admin, &get("/metrics").build()).await.unwrap();
    String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Replaces a file by rename, as editors and config managers do.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
