//! Task parameters: resolution against the pipeline's declarations, and `{{name}}`
//! substitution that shell-quotes every value, so that `x; rm -rf ~` or `$(id)` arrive at the
//! command as one literal word and never as shell syntax.

use std::collections::{BTreeMap, HashMap};

use pm_proto::v1::PipelineSpec;

use crate::Violation;
use crate::limits::MAX_PARAMS;
use crate::validate::{check_param_name, check_param_value};

/// A task's parameters after defaults, in name order.
pub type ResolvedParams = BTreeMap<String, String>;

enum Piece<'a> {
    Text(&'a str),
    Reference(&'a str),
}

/// Splits a command into literal text and `{{ name }}` references. A `{{` that does not open
/// a well-formed reference is literal text.
fn pieces(command: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = command;
    while let Some(open) = rest.find("{{") {
        let after = &rest[open + 2..];
        let inner = after.trim_start_matches(' ');
        let ident_len = inner
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .count();
        let tail = inner[ident_len..].trim_start_matches(' ');
        if ident_len > 0 && tail.starts_with("}}") {
            out.push(Piece::Text(&rest[..open]));
            out.push(Piece::Reference(&inner[..ident_len]));
            rest = &tail[2..];
        } else {
            out.push(Piece::Text(&rest[..open + 2]));
            rest = after;
        }
    }
    out.push(Piece::Text(rest));
    out
}

/// The parameter names a command references, in order, repeats included.
pub fn references(command: &str) -> impl Iterator<Item = &str> {
    pieces(command).into_iter().filter_map(|p| match p {
        Piece::Reference(name) => Some(name),
        Piece::Text(_) => None,
    })
}

/// Declares what a spec without a `params` section uses: every `{{name}}` of its commands
/// (not bound by its job's own `params`) becomes a required parameter, as the seed documents
/// write pipelines (`wget -O /mnt/pipe/image.png {{url}}`, then a task passes `url`). A spec
/// that declares any parameter is left as written, and stays strict: a reference it does not
/// declare is refused. A reference that is not a valid parameter name is left undeclared,
/// so validation refuses it at its command.
pub fn declare_implicit_params(spec: &mut PipelineSpec) {
    if !spec.params.is_empty() {
        return;
    }
    let mut used = Vec::new();
    for job in spec.stages.iter().flat_map(|s| &s.jobs) {
        for name in job.commands.iter().flat_map(|c| references(c)) {
            if !job.params.contains_key(name) && check_param_name(name).is_ok() {
                used.push(name.to_owned());
            }
        }
    }
    for name in used {
        spec.params
            .entry(name)
            .or_insert_with(|| pm_proto::v1::ParamSpec {
                required: true,
                default_value: None,
                description: "used by the commands; declared implicitly".into(),
            });
    }
}

/// Substitutes every `{{name}}` with the shell-quoted value from `lookup`. A reference that
/// `lookup` does not know is an error naming it (validation makes that unreachable for
/// applied pipelines, but inline specs and direct runs come here too).
pub fn render<'v>(
    command: &str,
    lookup: impl Fn(&str) -> Option<&'v str>,
) -> Result<String, Violation> {
    let mut out = String::with_capacity(command.len());
    for piece in pieces(command) {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Reference(name) => {
                let value = lookup(name).ok_or_else(|| {
                    Violation::new(format!("params.{name}"), "used by a command but not given")
                })?;
                let quoted = shlex::try_quote(value).map_err(|_| {
                    Violation::new(format!("params.{name}"), "must not contain NUL")
                })?;
                out.push_str(&quoted);
            }
        }
    }
    Ok(out)
}

/// The environment variable a parameter is exported as: `PM_PARAM_` + its name in upper case.
pub fn env_name(param: &str) -> String {
    format!("PM_PARAM_{}", param.to_ascii_uppercase())
}

/// Checks a task's parameters against the spec: every given name is declared, every
/// required one is given, values are bounded; defaults are filled in.
pub fn resolve_params(
    spec: &PipelineSpec,
    given: &HashMap<String, String>,
) -> Result<ResolvedParams, Violation> {
    if given.len() > MAX_PARAMS {
        return Err(Violation::new(
            "params",
            format!("{} parameters, more than {MAX_PARAMS}", given.len()),
        ));
    }
    let mut resolved = ResolvedParams::new();
    for (name, value) in given {
        let field = format!("params.{name}");
        check_param_name(name).map_err(|d| Violation::new(&field, d))?;
        if !spec.params.contains_key(name) {
            let mut declared: Vec<&str> = spec.params.keys().map(String::as_str).collect();
            declared.sort_unstable();
            let declared = if declared.is_empty() {
                "it declares none".to_owned()
            } else {
                format!("declared: {}", declared.join(", "))
            };
            return Err(Violation::new(
                field,
                format!("not a parameter of this pipeline ({declared})"),
            ));
        }
        check_param_value(&field, value)?;
        resolved.insert(name.clone(), value.clone());
    }
    let mut names: Vec<&String> = spec.params.keys().collect();
    names.sort_unstable();
    for name in names {
        let param = &spec.params[name];
        if resolved.contains_key(name) {
            continue;
        }
        match (&param.default_value, param.required) {
            (Some(default), _) => {
                resolved.insert(name.clone(), default.clone());
            }
            (None, true) => {
                return Err(Violation::new(
                    format!("params.{name}"),
                    "required by the pipeline but not given",
                ));
            }
            (None, false) => {
                // Optional without a default: substitutes as an empty word.
                resolved.insert(name.clone(), String::new());
            }
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use pm_proto::v1::ParamSpec;
    use proptest::prelude::*;

    use super::*;

    fn run_sh(script: &str) -> Vec<u8> {
        let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
        out.stdout
    }

    #[test]
    fn references_and_literal_braces() {
        let refs: Vec<&str> = references("a {{x}} {{ y }} {{}} {{z w}} ${{q}} }}").collect();
        assert_eq!(refs, vec!["x", "y", "q"]);
        let out = render("echo {{ x }} {{}} {{bad name}}", |_| Some("v")).unwrap();
        assert_eq!(out, "echo v {{}} {{bad name}}");
        assert_eq!(
            render("echo {{missing}}", |_| None).unwrap_err().field,
            "params.missing"
        );
        assert_eq!(env_name("url"), "PM_PARAM_URL");
    }

    #[test]
    fn a_task_may_give_every_declared_parameter_and_no_more() {
        let names: Vec<String> = (0..=MAX_PARAMS).map(|i| format!("p{i}")).collect();
        let spec = PipelineSpec {
            params: names[..MAX_PARAMS]
                .iter()
                .map(|n| (n.clone(), ParamSpec::default()))
                .collect(),
            ..PipelineSpec::default()
        };
        let given = |n: usize| -> HashMap<String, String> {
            names[..n].iter().map(|k| (k.clone(), "v".into())).collect()
        };
        assert_eq!(
            resolve_params(&spec, &given(MAX_PARAMS)).unwrap().len(),
            MAX_PARAMS
        );
        let over = resolve_params(&spec, &given(MAX_PARAMS + 1)).unwrap_err();
        assert_eq!(over.field, "params", "{}", over.description);
    }

    #[test]
    fn injection_attempts_stay_one_word() {
        for evil in [
            "x; touch /tmp/pm-never",
            "$(id)",
            "`id`",
            "a' b \"c",
            "--flag\nnewline",
            "*",
            "$HOME",
            "\\",
            "",
        ] {
            let cmd = render("printf '%s|' {{v}}", |_| Some(evil)).unwrap();
            assert_eq!(run_sh(&cmd), format!("{evil}|").into_bytes(), "{cmd}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_value_round_trips_through_sh(value in "[^\u{0}]{0,40}") {
            let cmd = render("printf '%s' {{v}}", |_| Some(value.as_str())).unwrap();
            prop_assert_eq!(run_sh(&cmd), value.into_bytes());
        }
    }

    #[test]
    fn a_spec_without_params_declares_what_its_commands_use() {
        // The workload-scheduler document's pipeline, as written there.
        let seed = r#"{"pipeline":[{"executor":"wget","commands":["wget -O /mnt/pipe/image.png {{url}}"]},{"executor":"tesseract","commands":["tesseract /mnt/pipe/image.png /mnt/pipe/result","cat /mnt/pipe/result.txt","rm /mnt/pipe/result.txt"]}]}"#;
        let spec = crate::load_document(seed, "spec_document").unwrap();
        let names: Vec<&str> = spec.params.keys().map(String::as_str).collect();
        assert_eq!(names, ["url"]);
        assert!(spec.params["url"].required);
        let missing = resolve_params(&spec, &HashMap::new()).unwrap_err();
        assert_eq!(missing.field, "params.url");

        // Declaring any parameter keeps the spec strict.
        let strict = "params: {a: {required: true}}
stages: [{name: s, jobs: [{name: j, commands: ['echo {{a}} {{b}}']}]}]";
        let refused = crate::load_document(strict, "spec_document").unwrap_err();
        assert_eq!(refused.field, "spec_document.stages[0].jobs[0].commands[0]");
        // A job's own params bind names; what is not a parameter name is refused, not declared.
        let bound =
            "stages: [{name: s, jobs: [{name: j, params: {b: x}, commands: ['echo {{b}}']}]}]";
        assert!(crate::load_document(bound, "d").unwrap().params.is_empty());
        let bad = "stages: [{name: s, jobs: [{name: j, commands: ['echo {{9lives}}']}]}]";
        assert!(crate::load_document(bad, "d").is_err());
    }

    #[test]
    fn params_resolve_against_declarations() {
        let spec = PipelineSpec {
            params: [
                (
                    "url".to_owned(),
                    ParamSpec {
                        required: true,
                        ..ParamSpec::default()
                    },
                ),
                (
                    "lang".to_owned(),
                    ParamSpec {
                        default_value: Some("eng".into()),
                        ..ParamSpec::default()
                    },
                ),
            ]
            .into(),
            ..PipelineSpec::default()
        };
        let given = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ok = resolve_params(&spec, &given(&[("url", "u")])).unwrap();
        assert_eq!(ok["lang"], "eng");
        assert_eq!(ok["url"], "u");
        let missing = resolve_params(&spec, &given(&[])).unwrap_err();
        assert_eq!(missing.field, "params.url");
        let unknown = resolve_params(&spec, &given(&[("url", "u"), ("x", "1")])).unwrap_err();
        assert_eq!(unknown.field, "params.x");
        assert!(unknown.description.contains("lang, url"), "{unknown}");
        let nul = resolve_params(&spec, &given(&[("url", "a\0b")])).unwrap_err();
        assert_eq!(nul.field, "params.url");
    }
}
