//! Files the tests run the gateway on: tenants, a dev PKI, replacing a file as config managers do.

use std::path::Path;
use std::process::Command;

use super::*;
use portcullis::identity::api_key;

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

# Every route of the API surface, two tenants of one plan to prove ids
# bound to one do not open for the other.
[plans.omni]
requests_per_second = 1000
burst = 1000
tokens_per_minute = 1_000_000
tokens_per_day = 10_000_000
max_concurrency = 100
max_body_bytes = 65_536
max_prompt_tokens = 4_096
max_output_tokens = 1_000
models = ["m-small", "whisper-1"]
features = ["chat", "embeddings", "responses", "messages", "moderations", "rerank", "audio", "stream", "tools"]

[[tenants]]
id = "omni"
org = "omni-co"
plan = "omni"
api_keys = ["{omni_hash}"]

[[tenants]]
id = "omni2"
org = "omni2-co"
plan = "omni"

[[tenants.keys]]
id = "ci-bot"
hash = "{ci_hash}"
expires_at = 2999-01-01T00:00:00+02:00
models = ["m-small"]

[[tenants.keys]]
id = "old"
hash = "{expired_hash}"
expires_at = 2020-01-01T00:00:00Z

[[tenants.keys]]
id = "off"
hash = "{disabled_hash}"
disabled = true

[[tenants]]
id = "throttled"
org = "throttled-co"
plan = "omni"
api_keys = ["{throttled_hash}"]
[tenants.overrides]
requests_per_second = 0.001
burst = 2

# Quota scopes: per-model limits (an exact name beats a prefix), key
# objects with limits of their own, and a money budget over [prices].
[prices."m-small"]
input = 1000.0
output = 2000.0
cached_input = 500.0

[plans.metered]
requests_per_second = 1000
burst = 1000
tokens_per_minute = 1_000_000
tokens_per_day = 10_000_000
max_concurrency = 100
max_body_bytes = 65_536
max_prompt_tokens = 4_096
max_output_tokens = 4_000
models = ["m-small", "big-*"]
features = ["chat", "stream"]
budget_per_day = 1000.0

[plans.metered.model_limits."big-*"]
tokens_per_minute = 1_000

[plans.metered.model_limits."big-70b"]
requests_per_second = 0.001
burst = 1

[[tenants]]
id = "metered"
org = "metered-co"
plan = "metered"
api_keys = ["{metered_hash}"]

[[tenants.keys]]
id = "capped"
hash = "{capped_hash}"
requests_per_second = 0.001
burst = 3
tokens_per_day = 3_000

[[tenants.keys]]
id = "other-bot"
hash = "{other_hash}"
tokens_per_day = 777_777
budget_per_month = 12.5

[[tenants]]
id = "budgeted"
org = "budgeted-co"
plan = "metered"
api_keys = ["{budget_hash}"]
[tenants.overrides]
budget_per_day = 0.06
"#,
        acme_hash = api_key::hash_entry(&keys.acme_key),
        omni_hash = api_key::hash_entry(&keys.omni_key),
        throttled_hash = api_key::hash_entry(&keys.throttled_key),
        ci_hash = api_key::hash_entry(&keys.ci_key),
        expired_hash = api_key::hash_entry(&keys.expired_key),
        disabled_hash = api_key::hash_entry(&keys.disabled_key),
        metered_hash = api_key::hash_entry(&keys.metered_key),
        capped_hash = api_key::hash_entry(&keys.capped_key),
        other_hash = api_key::hash_entry(&keys.other_key),
        budget_hash = api_key::hash_entry(&keys.budget_key)
    )
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

/// Replaces a file by rename, as editors and config managers do.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
