//! Rego policies, evaluated in process with `regorus`.
//!
//! The policy is parsed and compiled once per configuration snapshot; a
//! request evaluates it on a fresh VM (or interpreter clone), so nothing
//! is shared mutably between requests. regorus is built without its `http`
//! and `opa-runtime` builtins and has no file builtins: a policy sees only
//! its input.

use std::cell::RefCell;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::program::Program;
use regorus::rvm::vm::RegoVM;
use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{CompiledPolicy, Engine, Rc, Value};

use crate::config::diag::Diagnostic;

/// The rule the gateway evaluates: `{"deny": set, "headers": object}`.
pub const ENTRY_POINT: &str = "data.portcullis.authz.result";

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
        let diag = |file: &Path, message: String| Diagnostic {
            file: file.to_path_buf(),
            line: None,
            message,
        };
        let files = rego_files(path).map_err(|m| vec![diag(path, m)])?;
        if files.is_empty() {
            return Err(vec![diag(path, "no .rego file".into())]);
        }
        // Evaluation time is checked every few hundred steps of work.
        let timer = ExecutionTimerConfig {
            limit: timeout,
            check_interval: NonZeroU32::new(256).unwrap_or(NonZeroU32::MIN),
        };
        let mut engine = Engine::new();
        engine.set_execution_timer_config(timer);
        let mut errs = Vec::new();
        for f in &files {
            match std::fs::read_to_string(f) {
                Ok(text) => {
                    if let Err(e) = engine.add_policy(f.display().to_string(), text) {
                        errs.push(diag(f, format!("rego does not compile: {e}")));
                    }
                }
                Err(e) => errs.push(diag(f, format!("cannot read file: {e}"))),
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let entry: Rc<str> = Rc::from(ENTRY_POINT);
        let policy = engine
            .compile_with_entrypoint(&entry)
            .map_err(|e| vec![diag(path, format!("rego has no usable {ENTRY_POINT}: {e}"))])?;
        let evaluator = match Compiler::compile_from_policy(&policy, &[ENTRY_POINT]) {
            Ok(program) => Evaluator::Vm { policy, program },
            Err(e) => {
                tracing::info!(error = %e, "the Rego policy runs on the interpreter (not the VM)");
                Evaluator::Interpreter(Box::new(engine))
            }
        };
        let loaded = RegoPolicy { evaluator, timer };
        // One evaluation on an empty input proves the entry point runs.
        loaded.eval(Value::new_object()).map_err(|e| {
            vec![diag(
                path,
                format!("evaluating {ENTRY_POINT} on an empty input failed: {e}"),
            )]
        })?;
        Ok(loaded)
    }

    /// Whether the policy runs on regorus's VM.
    pub fn on_vm(&self) -> bool {
        matches!(self.evaluator, Evaluator::Vm { .. })
    }

    /// Evaluates the entry point for one input, on a fresh VM or a cheap
    /// clone of the prepared interpreter. Errors include the time limit;
    /// the caller fails closed.
    pub fn eval(&self, input: Value) -> Result<Value, String> {
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
                    vm.execute_entry_point_by_name(ENTRY_POINT)
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
                    .eval_rule(ENTRY_POINT.to_string())
                    .map_err(|e| e.to_string())
            }
        }
    }
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
    use crate::policy::rego_verdict;

    /// The shipped policy, loaded as the gateway loads it.
    fn shipped() -> RegoPolicy {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/authz.rego");
        let p =
            RegoPolicy::load(&path, Duration::from_millis(50)).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(p.on_vm(), "the shipped policy must stay on the fast path");
        p
    }

    /// 2026-11-25 (a Wednesday) at `hour`:30 UTC, in nanoseconds.
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
        rego_verdict(&p.eval(input).unwrap())
            .unwrap()
            .map_err(|r| r.code)
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
            .eval(Value::from_json_str(r#"{"tenant": {"plan": "gold"}}"#).unwrap())
            .unwrap();
        assert_eq!(
            rego_verdict(&out).unwrap().unwrap(),
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
        assert!(e[0].message.contains(ENTRY_POINT), "{e:?}");
    }
}
