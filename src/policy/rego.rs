//! Rego policies, evaluated in process with `regorus`.
//!
//! The policy is parsed and compiled once per configuration snapshot; a
//! request evaluates it on a fresh VM (or interpreter clone), so nothing
//! is shared mutably between requests. regorus is built without its `http`
//! and `opa-runtime` builtins and has no file builtins: a policy sees only
//! its input.
//!
//! A policy answers in one of two forms (README, "Policies"): the
//! documented `decision = {allow, code, message, headers}`, or the shipped
//! policy's `result = {deny, headers}`. `decision` wins when a file of
//! package `portcullis.authz` declares it.

use std::cell::RefCell;
use std::io::Read;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::program::Program;
use regorus::rvm::vm::RegoVM;
use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{CompiledPolicy, Engine, Rc, Value};

use crate::diag::Diagnostic;
use crate::policy::{intern_code, policy_header, PolicyHeaders, MAX_HEADERS, MAX_MESSAGE};
use crate::reject::{Reject, RejectCode};

/// The package a policy's entry rule lives in.
const PACKAGE: &str = "data.portcullis.authz";

/// The rule the gateway evaluates, found once when the policy loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// `decision = {allow, code, message, headers}`, the documented form.
    Decision,
    /// `result = {deny: set of {code, message}, headers}`, the shipped form.
    Result,
}

impl EntryPoint {
    fn rule(self) -> &'static str {
        match self {
            EntryPoint::Decision => "decision",
            EntryPoint::Result => "result",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            EntryPoint::Decision => "data.portcullis.authz.decision",
            EntryPoint::Result => "data.portcullis.authz.result",
        }
    }

    /// Reads the rule's value: the headers on an allow, the denial
    /// otherwise. Anything malformed is an error, and the caller fails
    /// closed.
    pub fn verdict(self, value: &Value) -> Result<Result<PolicyHeaders, Reject>, String> {
        if *value == Value::Undefined {
            return Err(format!("{} is undefined", self.path()));
        }
        match self {
            EntryPoint::Decision => decision_verdict(value),
            EntryPoint::Result => result_verdict(value),
        }
    }
}

thread_local! {
    /// Each worker thread reuses one VM for the program it was built for
    /// (a reload brings a new program, and so a new VM): building a VM per
    /// request costs more than running the shipped policy. Every run
    /// resets the VM's evaluation state.
    static VM: RefCell<Option<(Arc<Program>, RegoVM)>> = const { RefCell::new(None) };
}

/// A prepared policy for one snapshot.
pub struct RegoPolicy {
    evaluator: Evaluator,
    timer: ExecutionTimerConfig,
    entry: EntryPoint,
    /// What the compiler printed while this policy loaded.
    notes: Vec<CompilerNote>,
}

/// regorus's bytecode VM runs the shipped policy about four times faster
/// than its tree-walking interpreter, but does not compile every Rego
/// construct; a policy it cannot compile runs on the interpreter.
enum Evaluator {
    Vm {
        policy: CompiledPolicy,
        program: Arc<Program>,
    },
    /// Boxed: an engine is large, and the VM is the common case.
    Interpreter(Box<Engine>),
}

impl RegoPolicy {
    /// Parses the `.rego` file, or every `.rego` file under a folder, and
    /// checks that the entry point exists. `timeout` bounds one evaluation.
    pub fn load(path: &Path, timeout: Duration) -> Result<Self, Vec<Diagnostic>> {
        let files = rego_files(path).map_err(|m| vec![Diagnostic::in_file(path, m)])?;
        if files.is_empty() {
            return Err(vec![Diagnostic::in_file(path, "no .rego file")]);
        }
        // Evaluation time is checked every few hundred steps of work.
        let timer = ExecutionTimerConfig {
            limit: timeout,
            check_interval: NonZeroU32::new(256).unwrap_or(NonZeroU32::MIN),
        };
        let mut engine = Engine::new();
        engine.set_execution_timer_config(timer);
        let (loaded, notes) = catching_stderr(path, || Self::prepare(engine, &files, path, timer));
        loaded.map(|p| RegoPolicy { notes, ..p })
    }

    /// Adds the files, finds the entry rule, compiles it, and proves it
    /// runs on an empty input.
    fn prepare(
        mut engine: Engine,
        files: &[PathBuf],
        path: &Path,
        timer: ExecutionTimerConfig,
    ) -> Result<Self, Vec<Diagnostic>> {
        let mut errs = Vec::new();
        let mut entry = EntryPoint::Result;
        for f in files {
            let name = f.display().to_string();
            match std::fs::read_to_string(f) {
                Ok(text) => match engine.add_policy(name.clone(), text) {
                    Ok(package) if package == PACKAGE => {
                        if engine
                            .has_declared_rule_rooted_at(&name, EntryPoint::Decision.rule())
                            .unwrap_or(false)
                        {
                            entry = EntryPoint::Decision;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => errs.push(Diagnostic::in_file(
                        f,
                        format!("rego does not compile: {e}"),
                    )),
                },
                Err(e) => errs.push(Diagnostic::in_file(f, format!("cannot read file: {e}"))),
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let path_of = entry.path();
        let rule: Rc<str> = Rc::from(path_of);
        let policy = engine.compile_with_entrypoint(&rule).map_err(|e| {
            vec![Diagnostic::in_file(
                path,
                format!(
                    "rego has no usable {} or {}: {e}",
                    EntryPoint::Decision.path(),
                    EntryPoint::Result.path()
                ),
            )]
        })?;
        let evaluator = match Compiler::compile_from_policy(&policy, &[path_of]) {
            Ok(program) => Evaluator::Vm { policy, program },
            Err(e) => {
                tracing::info!(error = %e, "the Rego policy runs on the interpreter (not the VM)");
                Evaluator::Interpreter(Box::new(engine))
            }
        };
        let loaded = RegoPolicy {
            evaluator,
            timer,
            entry,
            notes: Vec::new(),
        };
        // One evaluation on an empty input proves the entry point runs.
        loaded.eval(Value::new_object()).map_err(|e| {
            vec![Diagnostic::in_file(
                path,
                format!("evaluating {path_of} on an empty input failed: {e}"),
            )]
        })?;
        Ok(loaded)
    }

    /// What regorus's compiler printed while this policy loaded.
    pub fn compiler_notes(&self) -> &[CompilerNote] {
        &self.notes
    }

    /// The rule this policy answers with.
    pub fn entry_point(&self) -> EntryPoint {
        self.entry
    }

    /// Evaluates the policy for one request and reads its verdict.
    pub fn decide(&self, input: Value) -> Result<Result<PolicyHeaders, Reject>, String> {
        self.eval(input).and_then(|v| self.entry.verdict(&v))
    }

    /// Whether the policy runs on regorus's VM.
    pub fn on_vm(&self) -> bool {
        matches!(self.evaluator, Evaluator::Vm { .. })
    }

    /// Evaluates the entry point for one input, on a fresh VM or a cheap
    /// clone of the prepared interpreter. Errors include the time limit;
    /// the caller fails closed.
    fn eval(&self, input: Value) -> Result<Value, String> {
        match &self.evaluator {
            Evaluator::Vm { policy, program } => VM.with(|slot| {
                let new_vm = || -> Result<RegoVM, String> {
                    let mut vm = RegoVM::new_with_policy(policy.clone());
                    vm.load_program(program.clone());
                    vm.set_execution_timer_config(Some(self.timer));
                    // The time limit bounds a policy, not the VM's default
                    // instruction budget (25,000), which real policies outgrow.
                    vm.set_max_instructions(usize::MAX);
                    vm.set_data(Value::new_object())
                        .map_err(|e| e.to_string())?;
                    Ok(vm)
                };
                let run = |vm: &mut RegoVM| {
                    vm.set_input(input);
                    vm.execute_entry_point_by_name(self.entry.path())
                        .map_err(|e| e.to_string())
                };
                let Ok(mut slot) = slot.try_borrow_mut() else {
                    return run(&mut new_vm()?);
                };
                let out = match &mut *slot {
                    Some((p, vm)) if Arc::ptr_eq(p, program) => run(vm),
                    other => {
                        let (_, vm) = other.insert((program.clone(), new_vm()?));
                        run(vm)
                    }
                };
                // A VM stopped mid-run (timeout, error) is not reused.
                if out.is_err() {
                    *slot = None;
                }
                out
            }),
            Evaluator::Interpreter(engine) => {
                let mut engine = (**engine).clone();
                engine.set_input(input);
                engine
                    .eval_rule(self.entry.path().to_string())
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// `result`: deny wins, with the lowest code so the answer does not depend
/// on set order; otherwise the headers.
fn result_verdict(result: &Value) -> Result<Result<PolicyHeaders, Reject>, String> {
    let denials: Vec<&Value> = match &result["deny"] {
        Value::Undefined => Vec::new(),
        Value::Set(s) => s.iter().collect(),
        Value::Array(a) => a.iter().collect(),
        _ => return Err("result.deny must be a set or an array".into()),
    };
    let mut first: Option<(&str, &str)> = None;
    for d in denials {
        let code = d["code"]
            .as_string()
            .map_err(|_| "every denial needs a string code")?;
        let message = message_of(&d["message"])?;
        if first.is_none_or(|(c, _)| code.as_ref() < c) {
            first = Some((code, message));
        }
    }
    match first {
        Some((code, message)) => denial(code, message).map(Err),
        None => headers_of(&result["headers"]).map(Ok),
    }
}

/// `decision`: `allow` must be a boolean. A denial carries the decision's
/// `code` (`policy_denied` when it gives none) and `message`; an allow,
/// its `headers`.
fn decision_verdict(decision: &Value) -> Result<Result<PolicyHeaders, Reject>, String> {
    match &decision["allow"] {
        Value::Bool(true) => headers_of(&decision["headers"]).map(Ok),
        Value::Bool(false) => {
            let code = match &decision["code"] {
                Value::Undefined | Value::Null => "policy_denied",
                c => c
                    .as_string()
                    .map_err(|_| "decision.code must be a string")?,
            };
            denial(code, message_of(&decision["message"])?).map(Err)
        }
        _ => Err("decision.allow must be true or false".into()),
    }
}

fn message_of(v: &Value) -> Result<&str, String> {
    match v {
        Value::Undefined | Value::Null => Ok("denied by policy"),
        m => Ok(m
            .as_string()
            .map_err(|_| "a denial's message must be a string")?),
    }
}

/// A 403 with the policy's code (kept to a bounded set) and its message,
/// without control characters.
fn denial(code: &str, message: &str) -> Result<Reject, String> {
    let code = intern_code(code)?;
    let message: String = message
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE)
        .collect();
    Ok(Reject::forbidden(RejectCode::Policy(code), message))
}

fn headers_of(v: &Value) -> Result<PolicyHeaders, String> {
    let mut headers = PolicyHeaders::new();
    match v {
        Value::Undefined => {}
        Value::Object(map) => {
            if map.len() > MAX_HEADERS {
                return Err(format!("more than {MAX_HEADERS} policy headers"));
            }
            for (name, value) in map.iter() {
                let name = name.as_string().map_err(|_| "header names are strings")?;
                let value = value
                    .as_string()
                    .map_err(|_| format!("header {name} must have a string value"))?;
                headers.push(policy_header(name, value)?);
            }
        }
        _ => return Err("the policy's headers must be an object".into()),
    }
    Ok(headers)
}

/// A line regorus's compiler printed for a policy. regorus writes some
/// diagnostics ("could not schedule all statements") straight to stderr,
/// with no file and no level; they are caught while the policy compiles and
/// logged once logging is up, naming the policy.
#[derive(Debug, Clone)]
pub struct CompilerNote {
    pub policy: PathBuf,
    pub message: String,
}

impl CompilerNote {
    pub fn log(&self) {
        tracing::warn!(policy = %self.policy.display(), message = %self.message, "rego compiler diagnostic");
    }
}

/// Runs `f` with stderr caught, and returns what it wrote as notes on
/// `policy`. The redirect is process-wide, so a line another thread writes
/// meanwhile becomes a note rather than being lost (the gateway's own log
/// goes to stdout). When stderr is already caught (two policies compiling
/// at once, as in unit tests), `f` runs uncaught.
fn catching_stderr<T>(policy: &Path, f: impl FnOnce() -> T) -> (T, Vec<CompilerNote>) {
    let Ok(mut caught) = gag::BufferRedirect::stderr() else {
        return (f(), Vec::new());
    };
    let out = f();
    let mut text = String::new();
    let read = caught.read_to_string(&mut text);
    drop(caught);
    if let Err(e) = read {
        text = format!("the compiler's output could not be read: {e}");
    }
    let notes = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| CompilerNote {
            policy: policy.to_path_buf(),
            message: l.to_string(),
        })
        .collect();
    (out, notes)
}

/// `path` itself, or the `.rego` files under it, sorted (for a stable
/// load order and stable error reports). `*_test.rego` files are OPA
/// unit tests (`opa test`), not policy.
fn rego_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries {
            let p = entry.map_err(|e| e.to_string())?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "rego")
                && !p.to_string_lossy().ends_with("_test.rego")
            {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped policy, loaded as the gateway loads it.
    fn shipped() -> RegoPolicy {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/authz.rego");
        let p =
            RegoPolicy::load(&path, Duration::from_millis(50)).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(p.on_vm(), "the shipped policy must stay on the fast path");
        p
    }

    /// 2026-11-30 (a Monday) at `hour`:30 UTC, in nanoseconds.
    fn at_hour(hour: i64) -> i64 {
        (1_795_996_800 + hour * 3600 + 1800) * 1_000_000_000
    }

    fn input(
        org: &str,
        plan: &str,
        model: &str,
        features: &[&str],
        claims: &str,
        ns: i64,
    ) -> Value {
        let features = serde_json::to_string(features).unwrap();
        Value::from_json_str(&format!(
            r#"{{"tenant": {{"id": "t", "org": "{org}", "plan": "{plan}", "limits": {{}}}},
                "identity": {{"kind": "jwt", "subject": "u", "claims": {claims}}},
                "request": {{"method": "POST", "route": "/v1/chat/completions", "model": "{model}",
                             "features": {features}, "region": "us-east-1", "body_bytes": 100, "prompt_tokens": 10}},
                "time": {{"unix_ns": {ns}}}}}"#
        ))
        .unwrap()
    }

    /// The denial code, or `None` with the headers on an allow.
    fn decide(p: &RegoPolicy, input: Value) -> Result<Vec<(String, String)>, &'static str> {
        p.decide(input).unwrap().map_err(|r| r.code.as_str())
    }

    fn load_text(text: &str) -> Result<RegoPolicy, Vec<Diagnostic>> {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("policy.rego");
        std::fs::write(&f, text).unwrap();
        RegoPolicy::load(&f, Duration::from_millis(50))
    }

    fn result_of(json: &str) -> Result<Result<PolicyHeaders, Reject>, String> {
        EntryPoint::Result.verdict(&Value::from_json_str(json).unwrap())
    }

    fn decision_of(json: &str) -> Result<Result<PolicyHeaders, Reject>, String> {
        EntryPoint::Decision.verdict(&Value::from_json_str(json).unwrap())
    }

    #[test]
    fn deny_wins_with_the_lowest_code() {
        let r = result_of(r#"{"deny": [{"code": "zeta", "message": "z"}, {"code": "alpha", "message": "a"}], "headers": {"x-tenant-policy-a": "1"}}"#)
            .unwrap()
            .unwrap_err();
        assert_eq!(
            (r.status, r.code.as_str(), r.message.as_ref()),
            (403, "alpha", "a")
        );
    }

    #[test]
    fn allow_carries_only_well_formed_policy_headers() {
        let h = result_of(r#"{"deny": [], "headers": {"X-Tenant-Policy-Tier": "low"}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(h, vec![("x-tenant-policy-tier".into(), "low".into())]);
        for bad in [
            r#"{"headers": {"x-tenant-id": "other"}}"#,
            r#"{"headers": {"x-tenant-policy-": "v"}}"#,
            r#"{"headers": {"x-tenant-policy-a": "line\nbreak"}}"#,
            r#"{"headers": {"x-tenant-policy-a": 1}}"#,
            r#"{"deny": [{"code": "Bad Code"}]}"#,
            r#"{"deny": [{"message": "no code"}]}"#,
            r#"{"deny": "yes"}"#,
        ] {
            assert!(result_of(bad).is_err(), "{bad}");
        }
        assert!(EntryPoint::Result.verdict(&Value::Undefined).is_err());
    }

    #[test]
    fn a_decision_denies_with_its_code_or_policy_denied() {
        let r = decision_of(r#"{"allow": false, "code": "after_hours", "message": "closed"}"#)
            .unwrap()
            .unwrap_err();
        assert_eq!(
            (r.status, r.code.as_str(), r.message.as_ref()),
            (403, "after_hours", "closed")
        );
        let r = decision_of(r#"{"allow": false}"#).unwrap().unwrap_err();
        assert_eq!(
            (r.status, r.code.as_str(), r.message.as_ref()),
            (403, "policy_denied", "denied by policy")
        );
        let h = decision_of(
            r#"{"allow": true, "code": "ignored", "headers": {"x-tenant-policy-tier": "gold"}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h, vec![("x-tenant-policy-tier".into(), "gold".into())]);
        assert_eq!(decision_of(r#"{"allow": true}"#).unwrap().unwrap(), vec![]);
        for bad in [
            r#"{}"#,
            r#"{"allow": "yes"}"#,
            r#"{"allow": 1}"#,
            r#"{"allow": false, "code": 7}"#,
            r#"{"allow": false, "code": "Bad Code"}"#,
            r#"{"allow": false, "message": ["x"]}"#,
            r#"{"allow": true, "headers": {"x-tenant-id": "other"}}"#,
            r#"{"allow": true, "headers": []}"#,
        ] {
            assert!(decision_of(bad).is_err(), "{bad}");
        }
        assert!(EntryPoint::Decision.verdict(&Value::Undefined).is_err());
    }

    #[test]
    fn a_policy_that_defines_decision_is_evaluated_by_it() {
        let p = load_text(
            "package portcullis.authz\nimport rego.v1\n\
             default decision := {\"allow\": false, \"code\": \"closed\", \"message\": \"weekdays only\"}\n\
             decision := {\"allow\": true, \"headers\": {\"x-tenant-policy-day\": input.time.weekday}} if {\n\
               not input.time.weekday in {\"Saturday\", \"Sunday\"}\n\
               input.time.hour_utc >= 0\n\
               input.time.unix > 0\n\
             }\n\
             # The shipped form beside it does not take over.\n\
             result := {\"deny\": {{\"code\": \"never\"}}}\n",
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(p.entry_point(), EntryPoint::Decision);
        let at = |weekday: &str| {
            Value::from_json_str(&format!(
                r#"{{"time": {{"unix": 1795996800, "hour_utc": 12, "weekday": "{weekday}"}}}}"#
            ))
            .unwrap()
        };
        assert_eq!(
            decide(&p, at("Wednesday")),
            Ok(vec![("x-tenant-policy-day".into(), "Wednesday".into())])
        );
        assert_eq!(decide(&p, at("Sunday")), Err("closed"));
    }

    const SCOPED: &str = r#"{"scope": "inference:read inference:write"}"#;

    #[test]
    fn shipped_policy_restricts_tools_by_org_and_region() {
        let p = shipped();
        let noon = at_hour(12);
        assert_eq!(
            decide(
                &p,
                input("globex-inc", "pro", "m", &["chat", "tools"], SCOPED, noon)
            ),
            Err("tools_region_restricted")
        );
        assert!(decide(&p, input("globex-inc", "pro", "m", &["chat"], SCOPED, noon)).is_ok());
        assert!(decide(
            &p,
            input("acme-corp", "pro", "m", &["chat", "tools"], SCOPED, noon)
        )
        .is_ok());
    }

    #[test]
    fn shipped_policy_keeps_70b_off_the_free_plan_in_business_hours() {
        let p = shipped();
        let big = "llama-3.1-70b-instruct";
        for (hour, denied) in [(8, false), (9, true), (16, true), (17, false)] {
            let got = decide(
                &p,
                input("acme-corp", "free", big, &["chat"], SCOPED, at_hour(hour)),
            );
            assert_eq!(got.is_err(), denied, "hour {hour}: {got:?}");
        }
        let pro = decide(
            &p,
            input("acme-corp", "pro", big, &["chat"], SCOPED, at_hour(12)),
        );
        assert!(pro.is_ok());
        let small = input(
            "acme-corp",
            "free",
            "llama-3.1-8b",
            &["chat"],
            SCOPED,
            at_hour(12),
        );
        assert_eq!(
            decide(&p, small),
            Ok(vec![("x-tenant-policy-priority".into(), "low".into())])
        );
    }

    #[test]
    fn a_reused_vm_carries_nothing_from_one_request_to_the_next() {
        let p = shipped();
        let noon = at_hour(12);
        let denied = || input("globex-inc", "pro", "m", &["chat", "tools"], SCOPED, noon);
        let allowed = || input("acme-corp", "free", "m", &["chat"], SCOPED, noon);
        for _ in 0..3 {
            assert_eq!(decide(&p, denied()), Err("tools_region_restricted"));
            assert_eq!(
                decide(&p, allowed()),
                Ok(vec![("x-tenant-policy-priority".into(), "low".into())])
            );
        }
    }

    #[test]
    fn shipped_policy_needs_the_write_scope_on_tokens() {
        let p = shipped();
        let noon = at_hour(12);
        for claims in [
            r#"{}"#,
            r#"{"scope": "inference:read"}"#,
            r#"{"scp": ["inference:read"]}"#,
            r#"{"scope": 7}"#,
        ] {
            assert_eq!(
                decide(&p, input("acme-corp", "pro", "m", &["chat"], claims, noon)),
                Err("missing_scope"),
                "{claims}"
            );
        }
        assert!(decide(
            &p,
            input(
                "acme-corp",
                "pro",
                "m",
                &["chat"],
                r#"{"scp": ["inference:write"]}"#,
                noon
            )
        )
        .is_ok());
    }

    #[test]
    fn a_runaway_policy_is_stopped_by_the_time_limit() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("slow.rego");
        std::fs::write(
            &f,
            "package portcullis.authz\nimport rego.v1\nr := numbers.range(1, 1000)\n\
             result := {\"deny\": {x | some a in r; some b in r; some c in r; x := a + b + c; x < 0}, \"headers\": {}} if input.slow\n",
        )
        .unwrap();
        let p = RegoPolicy::load(&f, Duration::from_millis(20)).unwrap();
        assert!(p.on_vm());
        // 10^9 steps: only the time limit ends it.
        let e = p
            .eval(Value::from_json_str(r#"{"slow": true}"#).unwrap())
            .expect_err("a 10^9-step policy finished");
        assert!(e.contains("time limit"), "{e}");
    }

    #[test]
    fn a_policy_the_vm_cannot_compile_runs_on_the_interpreter() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("headers.rego");
        // Partial objects with constant keys are beyond the VM's compiler.
        std::fs::write(
            &f,
            "package portcullis.authz\nimport rego.v1\nresult := {\"deny\": set(), \"headers\": headers}\n\
             headers[\"x-tenant-policy-tier\"] := input.tenant.plan\n",
        )
        .unwrap();
        let p = RegoPolicy::load(&f, Duration::from_millis(20)).unwrap();
        assert!(!p.on_vm());
        let out = p
            .decide(Value::from_json_str(r#"{"tenant": {"plan": "gold"}}"#).unwrap())
            .unwrap();
        assert_eq!(
            out.unwrap(),
            vec![("x-tenant-policy-tier".into(), "gold".into())]
        );
    }

    #[test]
    fn a_policy_that_does_not_compile_or_lacks_the_entry_point_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.rego");
        std::fs::write(&f, "package portcullis.authz\nresult := {\n").unwrap();
        assert!(RegoPolicy::load(&f, Duration::from_millis(20)).is_err());
        std::fs::write(&f, "package other\nimport rego.v1\nx := 1\n").unwrap();
        let e = RegoPolicy::load(&f, Duration::from_millis(20))
            .err()
            .unwrap();
        assert!(e[0].message.contains(EntryPoint::Decision.path()), "{e:?}");
        assert!(e[0].message.contains(EntryPoint::Result.path()), "{e:?}");
    }
}
