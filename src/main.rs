//! The `portcullis` command line.

/// glibc's allocator fragments under the gateway's many short-lived
/// allocations per request; mimalloc's per-thread heaps cost less CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portcullis::config::diag::ConfigErrors;
use portcullis::config::tenants;
use portcullis::config::Snapshot;
use portcullis::demo::{self, DemoArgs};
use portcullis::dev::{self, MintRequest, DEV_AUDIENCE, DEV_ISSUER, DEV_KID};
use portcullis::identity::api_key;
use portcullis::mock_router::{MockOptions, MockRouter};
use portcullis::server::{self, ProcessFlags};
use portcullis::tenant::KeyObject;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Edge gateway for multi-tenant LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(short = 'c', long = "conf")]
        config: PathBuf,
        /// Run in the background (Pingora's -d).
        #[arg(short, long)]
        daemon: bool,
        /// Take the sockets over from a running instance (Pingora's -u).
        #[arg(short, long)]
        upgrade: bool,
        /// Check the configuration and exit (Pingora's -t).
        #[arg(short, long)]
        test: bool,
    },
    /// Validate gateway.toml and every file it names; prints `file:line: message`.
    Check {
        #[arg(short = 'c', long = "conf")]
        config: PathBuf,
    },
    /// Run the gateway in front of a built-in mock router, with dev credentials.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9000")]
        router: SocketAddr,
    },
    /// API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Dev JWTs.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Dev certificates and keys.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Run only the mock router (for benchmarks and experiments).
    MockRouter {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
        /// Delay each answer by this many milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Content events in a streamed answer.
        #[arg(long, default_value_t = 3)]
        stream_chunks: usize,
        /// Worker threads (1: a single-threaded runtime, the cheapest
        /// upstream for a benchmark to share a core with its load generator).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Issue a new API key; prints it once, with its tenants.toml entry.
    New {
        /// Print a `[[tenants.keys]]` block with this key id (a-z 0-9 _ -)
        /// instead of an `api_keys` entry.
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a dev JWT (by default with the key `portcullis demo` generated).
    Mint {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "dev-user")]
        subject: String,
        /// Ed25519 PKCS#8 PEM signing key.
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long, default_value = DEV_KID)]
        kid: String,
        #[arg(long, default_value = DEV_ISSUER)]
        issuer: String,
        #[arg(long, default_value = DEV_AUDIENCE)]
        audience: String,
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// The OAuth `scope` claim (space-separated); the shipped Rego
        /// policy requires `inference:write`.
        #[arg(long, default_value = dev::DEV_SCOPE)]
        scope: String,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Generate dev credentials: a JWT signing key and its JWKS, and the context key.
    Dev {
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Where to write the JWKS (gateway.toml's jwks_file).
        #[arg(long, default_value = "policies/jwks.json")]
        jwks: PathBuf,
        /// Issue a client certificate for each tenant's first mtls_identity.
        #[arg(long, default_value = "policies/tenants.toml")]
        tenants: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Command) -> Result<(), String> {
    match cmd {
        Command::Serve {
            config,
            daemon,
            upgrade,
            test,
        } => {
            if test {
                return check(&config);
            }
            server::serve(&config, ProcessFlags { daemon, upgrade })
        }
        Command::Check { config } => check(&config),
        Command::Demo {
            listen,
            admin,
            router,
        } => demo::run(&DemoArgs {
            listen,
            admin,
            router,
        }),
        Command::Keys {
            command: KeysCommand::New { id },
        } => {
            if let Some(bad) = id.as_deref().filter(|i| !KeyObject::valid_id(i)) {
                return Err(format!(
                    "key id {bad:?} must be 1-64 characters of a-z 0-9 _ -"
                ));
            }
            let key = api_key::generate();
            println!("API key (shown once, store it now): {key}");
            match id {
                None => println!(
                    "Add to the tenant in tenants.toml:  api_keys = [\"{}\"]",
                    api_key::hash_entry(&key)
                ),
                Some(id) => println!(
                    "Add under the tenant in tenants.toml:\n\n[[tenants.keys]]\nid = \"{id}\"\nhash = \"{}\"\n# expires_at = 2027-06-30T00:00:00Z\n# models = [\"...\"]    # narrows the tenant's allowlist\n# tokens_per_day = 50_000   # the key's own limits, inside the tenant's\n# budget_per_day = 5.0",
                    api_key::hash_entry(&key)
                ),
            }
            Ok(())
        }
        Command::Token {
            command:
                TokenCommand::Mint {
                    tenant,
                    subject,
                    key,
                    kid,
                    issuer,
                    audience,
                    ttl,
                    scope,
                },
        } => {
            let key = key.unwrap_or_else(|| demo::demo_dir().join("dev-jwt.pem"));
            let pem = std::fs::read(&key).map_err(|e| {
                format!(
                    "{}: {e} (run `portcullis demo` or `portcullis certs dev` first)",
                    key.display()
                )
            })?;
            let token = dev::mint(
                &pem,
                &MintRequest {
                    tenant: &tenant,
                    subject: &subject,
                    issuer: &issuer,
                    audience: &audience,
                    kid: &kid,
                    ttl_seconds: ttl,
                    scope: &scope,
                },
            )?;
            println!("{token}");
            Ok(())
        }
        Command::Certs {
            command: CertsCommand::Dev { out, jwks, tenants },
        } => {
            let identities: Vec<(String, String)> = match tenants::load(&tenants, None) {
                Ok(t) => t
                    .list
                    .iter()
                    .filter_map(|t| Some((t.id.clone(), t.mtls_identities.first()?.clone())))
                    .collect(),
                Err(_) if !tenants.exists() => Vec::new(),
                Err(e) => return Err(ConfigErrors(e).to_string()),
            };
            let files = dev::write_dev_credentials(&out, &jwks, &identities)?;
            for f in [&files.jwt_key, &files.context_key, &files.jwks]
                .into_iter()
                .chain(&files.certificates)
            {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
        Command::MockRouter {
            listen,
            delay_ms,
            stream_chunks,
            threads,
        } => {
            let rt = if threads <= 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(threads);
                b
            }
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let opts = MockOptions {
                    delay: std::time::Duration::from_millis(delay_ms),
                    record: false,
                    stream_chunks,
                    ..MockOptions::default()
                };
                let router = MockRouter::start(&listen, opts)
                    .await
                    .map_err(|e| format!("{listen}: {e}"))?;
                println!("mock router on {}", router.addr());
                std::future::pending::<()>().await;
                Ok(())
            })
        }
    }
}

/// `portcullis check`: every problem, one `file:line: message` per line.
fn check(config: &std::path::Path) -> Result<(), String> {
    let snap = Snapshot::load(config).map_err(|e| e.to_string())?;
    for note in snap.policies.rego.iter().flat_map(|r| r.compiler_notes()) {
        println!("{}: warning: {}", note.policy.display(), note.message);
    }
    println!(
        "{}: ok ({} tenants)",
        config.display(),
        snap.tenants.list.len()
    );
    Ok(())
}
