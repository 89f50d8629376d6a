//! The command line: `check` diagnostics, key issuance, dev credentials.

use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn portcullis(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .current_dir(cwd)
        .env("PORTCULLIS_LOG", "error")
        .output()
        .expect("run portcullis")
}

const GATEWAY: &str = r#"[server]
listen = ["127.0.0.1:18999"]
region = "us-east-1"

[upstream]
address = "127.0.0.1:18998"

[policy]
tenants = "tenants.toml"

[context]
signing_key_file = "context.key"
"#;

const TENANTS: &str = r#"[plans.free]
requests_per_second = 2
burst = 4
tokens_per_minute = 20_000
tokens_per_day = 200_000
max_concurrency = 2
max_body_bytes = 65_536
max_prompt_tokens = 4_096
max_output_tokens = 1_024
models = ["m"]
features = ["chat"]

[[tenants]]
id = "acme"
org = "acme-corp"
plan = "free"
"#;

/// A directory holding a valid configuration, for each test to break.
fn valid_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.toml"), GATEWAY).unwrap();
    std::fs::write(dir.path().join("tenants.toml"), TENANTS).unwrap();
    std::fs::write(dir.path().join("context.key"), "ab".repeat(32)).unwrap();
    dir
}

/// Runs `check`, expects failure, and returns stderr.
fn check_fails(dir: &Path) -> String {
    let out = portcullis(&["check", "-c", "gateway.toml"], dir);
    assert!(!out.status.success(), "check accepted a broken config");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn check_accepts_a_valid_config_and_the_shipped_one() {
    let dir = valid_dir();
    let out = portcullis(&["check", "-c", "gateway.toml"], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 tenants)"));
    // serve -t is the same check.
    let out = portcullis(&["serve", "-t", "-c", "gateway.toml"], dir.path());
    assert!(out.status.success());
}

#[test]
fn check_reports_an_unknown_key_with_its_line() {
    let dir = valid_dir();
    let text = GATEWAY.replace("region =", "regoin =");
    std::fs::write(dir.path().join("gateway.toml"), text).unwrap();
    let err = check_fails(dir.path());
    assert!(
        err.contains("gateway.toml:3: unknown field `regoin`"),
        "{err}"
    );
}

#[test]
fn check_reports_an_undefined_plan_with_its_line() {
    let dir = valid_dir();
    std::fs::write(
        dir.path().join("tenants.toml"),
        TENANTS.replace("plan = \"free\"", "plan = \"gold\""),
    )
    .unwrap();
    let err = check_fails(dir.path());
    assert!(
        err.contains("tenants.toml:16: tenant \"acme\" names undefined plan \"gold\""),
        "{err}"
    );
}

#[test]
fn check_reports_a_duplicate_tenant_with_its_line() {
    let dir = valid_dir();
    let text = format!("{TENANTS}\n[[tenants]]\nid = \"acme\"\norg = \"x\"\nplan = \"free\"\n");
    std::fs::write(dir.path().join("tenants.toml"), text).unwrap();
    let err = check_fails(dir.path());
    assert!(
        err.contains("tenants.toml:19: duplicate tenant id \"acme\""),
        "{err}"
    );
}

#[test]
fn check_reports_a_malformed_key_hash_with_its_line() {
    let dir = valid_dir();
    let text = format!("{TENANTS}api_keys = [\"pcl_plaintext_key\"]\n");
    std::fs::write(dir.path().join("tenants.toml"), text).unwrap();
    let err = check_fails(dir.path());
    assert!(
        err.contains("tenants.toml:17: api_keys entries must be \"sha256:\""),
        "{err}"
    );
}

#[test]
fn check_reports_guardrail_errors_with_their_lines() {
    let dir = valid_dir();
    let text = format!(
        "{TENANTS}\n[plans.free.guardrails]\npii = \"mask\"\n\
         deny = [\"ok\", \"(unclosed\"]\npii_kinds = [\"email\", \"ssn\"]\n"
    );
    std::fs::write(dir.path().join("tenants.toml"), text).unwrap();
    let err = check_fails(dir.path());
    assert!(
        err.contains(
            "tenants.toml:20: plan \"free\": guardrails: deny rule 1 does not compile: unclosed group"
        ),
        "{err}"
    );
    assert!(
        err.contains("tenants.toml:21: plan \"free\": guardrails: unknown pii_kinds entry \"ssn\""),
        "{err}"
    );
    let text = format!("{TENANTS}[tenants.overrides.guardrails]\npii = \"redact\"\n");
    std::fs::write(dir.path().join("tenants.toml"), text).unwrap();
    let err = check_fails(dir.path());
    assert!(
        err.contains("tenants.toml:18:") && err.contains("unknown variant `redact`"),
        "{err}"
    );
}

#[test]
fn check_reports_missing_files_and_bad_values() {
    let dir = valid_dir();
    std::fs::remove_file(dir.path().join("tenants.toml")).unwrap();
    let err = check_fails(dir.path());
    assert!(
        err.contains("gateway.toml:9: file") && err.contains("tenants.toml does not exist"),
        "{err}"
    );

    let dir = valid_dir();
    std::fs::write(dir.path().join("context.key"), "abcd").unwrap();
    let err = check_fails(dir.path());
    assert!(
        err.contains("context.key: signing key has 2 bytes"),
        "{err}"
    );

    let dir = valid_dir();
    let text = format!("{GATEWAY}\n[auth.jwt]\nissuer = \"i\"\naudiences = [\"a\"]\njwks_url = \"https://idp/\"\nleeway_seconds = 120\n");
    std::fs::write(dir.path().join("gateway.toml"), text).unwrap();
    let err = check_fails(dir.path());
    assert!(
        err.contains("gateway.toml:18: leeway_seconds must be at most 30"),
        "{err}"
    );
}

#[test]
fn check_refuses_a_health_check_path_that_is_not_a_path() {
    for bad in ["healthz", "/health check", "http://router/healthz"] {
        let dir = valid_dir();
        let text = GATEWAY.replace(
            "address = \"127.0.0.1:18998\"\n",
            &format!("address = \"127.0.0.1:18998\"\nhealth_check_path = \"{bad}\"\n"),
        );
        std::fs::write(dir.path().join("gateway.toml"), text).unwrap();
        let err = check_fails(dir.path());
        assert!(
            err.contains("gateway.toml:7: [upstream] health_check_path must be a path"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn check_refuses_unverified_router_tls_without_the_insecure_acknowledgement() {
    let with_upstream = |lines: &str| {
        let dir = valid_dir();
        let text = GATEWAY.replace(
            "address = \"127.0.0.1:18998\"\n",
            &format!(
                "address = \"127.0.0.1:18998\"\ntls = true\nsni = \"router.internal\"\n{lines}"
            ),
        );
        std::fs::write(dir.path().join("gateway.toml"), text).unwrap();
        dir
    };
    let err = check_fails(with_upstream("verify = false\n").path());
    assert!(
        err.contains("gateway.toml:9: [upstream] verify = false")
            && err.contains("insecure = true"),
        "{err}"
    );
    let err = check_fails(with_upstream("insecure = true\n").path());
    assert!(
        err.contains("gateway.toml:9: [upstream] insecure = true only acknowledges verify = false"),
        "{err}"
    );
    let dir = with_upstream("verify = false\ninsecure = true\n");
    let out = portcullis(&["check", "-c", "gateway.toml"], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn keys_new_prints_a_key_once_with_its_hash_entry() {
    let dir = tempfile::tempdir().unwrap();
    let out = portcullis(&["keys", "new"], dir.path());
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .split_whitespace()
        .find(|w| w.starts_with("pcl_"))
        .expect("a pcl_ key");
    assert_eq!(key.len(), 44);
    assert!(key[4..]
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    assert!(
        text.contains(&format!("api_keys = [\"sha256:{hash}\"]")),
        "{text}"
    );
}

#[test]
fn dev_credentials_mint_tokens_the_shipped_config_accepts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    // A copy of the repository's deploy/ and policies/ with fresh dev keys.
    for sub in ["deploy", "policies", "policies/schemas", "certs"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    for f in [
        "deploy/gateway.toml",
        "policies/tenants.toml",
        "policies/routes.toml",
        "policies/schemas/chat_completions.json",
        "policies/schemas/completions.json",
        "policies/schemas/embeddings.json",
        "policies/schemas/responses.json",
        "policies/schemas/messages.json",
        "policies/schemas/moderations.json",
        "policies/schemas/rerank.json",
        "policies/authz.rego",
    ] {
        std::fs::copy(root.join(f), dir.path().join(f)).unwrap();
    }
    let out = portcullis(
        &[
            "certs",
            "dev",
            "--out",
            "certs",
            "--jwks",
            "policies/jwks.json",
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = portcullis(&["check", "-c", "deploy/gateway.toml"], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = portcullis(
        &[
            "token",
            "mint",
            "--tenant",
            "acme",
            "--key",
            "certs/dev-jwt.pem",
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let jwks = std::fs::read(dir.path().join("policies/jwks.json")).unwrap();
    let set =
        portcullis::identity::jwks::KeySet::from_json(&jwks, &[jsonwebtoken::Algorithm::EdDSA])
            .unwrap();
    let key = set
        .select(Some("dev-ed25519"), jsonwebtoken::Algorithm::EdDSA)
        .unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&["portcullis"]);
    v.set_issuer(&["https://idp.example.com"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(token.trim(), &key.key, &v).unwrap();
    assert_eq!(data.claims["tenant"], "acme");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("certs/dev-jwt.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private key readable by others");
    }
}

/// `keys new --id` prints a `[[tenants.keys]]` block that, pasted under a
/// tenant, loads and finds its key.
#[test]
fn keys_new_with_an_id_prints_a_block_that_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = portcullis(&["keys", "new", "--id", "ci-bot"], dir.path());
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .split_whitespace()
        .find(|w| w.starts_with("pcl_"))
        .expect("a pcl_ key");
    let block = &text[text.find("[[tenants.keys]]").expect("the block")..];
    let tenants = format!(
        "[plans.p]\nrequests_per_second = 1\nburst = 1\ntokens_per_minute = 1\ntokens_per_day = 1\n\
         max_concurrency = 1\nmax_body_bytes = 1\nmax_prompt_tokens = 1\nmax_output_tokens = 1\n\
         models = [\"m\"]\nfeatures = [\"chat\"]\n\n[[tenants]]\nid = \"acme\"\norg = \"o\"\nplan = \"p\"\n\n{block}"
    );
    let path = dir.path().join("tenants.toml");
    std::fs::write(&path, tenants).unwrap();
    let loaded = portcullis::config::tenants::load(&path, None).unwrap();
    let digest = portcullis::identity::api_key::digest(key);
    let (tenant, object) = loaded.by_api_key_hash(&digest).expect("the key resolves");
    assert_eq!(
        (tenant.id.as_str(), object.map(|k| k.id.as_str())),
        ("acme", Some("ci-bot"))
    );
    let bad = portcullis(&["keys", "new", "--id", "Bad Id"], dir.path());
    assert!(!bad.status.success());
    assert!(bad.stdout.is_empty(), "no key is printed for a bad id");
}

#[test]
fn check_refuses_bad_telemetry_and_observe_values_with_their_lines() {
    let cases = [
        (
            "[telemetry]\notlp_endpoint = \"collector:4318\"\n",
            "[telemetry] otlp_endpoint must be an http:// or https:// address",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\nsample_ratio = 1.5\n",
            "[telemetry] sample_ratio must be between 0.0 and 1.0",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\nprotocol = \"http/json\"\n",
            "unknown variant `http/json`, expected `http/protobuf` or `grpc`",
        ),
        (
            "[observe]\ntenant_label = \"org\"\n",
            "unknown variant `org`, expected one of `id`, `plan`, `none`",
        ),
    ];
    for (table, message) in cases {
        let dir = valid_dir();
        let text = format!("{GATEWAY}\n{table}");
        std::fs::write(dir.path().join("gateway.toml"), &text).unwrap();
        let header = table.lines().next().unwrap();
        let first = 1 + text.lines().position(|l| l == header).unwrap();
        let err = check_fails(dir.path());
        assert!(err.contains(message), "{table}: {err}");
        // The diagnostic names the line of the offending value.
        let line = (first..first + 3).any(|n| err.contains(&format!("gateway.toml:{n}:")));
        assert!(line, "{table}: no line in {err}");
    }
    let dir = valid_dir();
    let good = "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\nprotocol = \"grpc\"\n\
                [observe]\ntenant_label = \"plan\"\n";
    std::fs::write(
        dir.path().join("gateway.toml"),
        format!("{GATEWAY}\n{good}"),
    )
    .unwrap();
    let out = portcullis(&["check", "-c", "gateway.toml"], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
