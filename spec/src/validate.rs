//! Checks a structured spec: names, limits, priorities, and that every `{{name}}` a command
//! uses is a declared parameter. Paths in violations are relative to the spec.

use std::collections::HashSet;

use pm_proto::v1::{JobKind, PipelineSpec};

use crate::Violation;
use crate::limits::*;
use crate::template::references;

/// Stage, job and executor names: 1..=63 of ASCII letters, digits, '-', '_' and '.'.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("longer than {MAX_NAME_BYTES} bytes"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "{name:?} may only hold ASCII letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// Parameter names: a letter or '_', then letters, digits and '_' (so each maps to one
/// environment variable `PM_PARAM_<NAME>`).
pub fn check_param_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let ok = name.len() <= MAX_NAME_BYTES
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a parameter name: a letter or '_', then letters, digits or '_', at most {MAX_NAME_BYTES}"
        ))
    }
}

/// Checks a priority field; `None` means the default.
pub fn check_priority(field: &str, priority: Option<u32>) -> Result<(), Violation> {
    match priority {
        Some(p) if p > MAX_PRIORITY => Err(Violation::new(
            field,
            format!("{p} is out of range 0..={MAX_PRIORITY}"),
        )),
        _ => Ok(()),
    }
}

/// Checks a timeout in seconds.
pub fn check_timeout(field: &str, seconds: u32) -> Result<(), Violation> {
    if seconds > MAX_TIMEOUT_SECONDS {
        return Err(Violation::new(
            field,
            format!("{seconds} is more than {MAX_TIMEOUT_SECONDS} seconds"),
        ));
    }
    Ok(())
}

/// Checks a structured spec; the first violation found is returned.
pub fn validate(spec: &PipelineSpec) -> Result<(), Violation> {
    if spec.params.len() > MAX_PARAMS {
        return Err(Violation::new(
            "params",
            format!("{} parameters, more than {MAX_PARAMS}", spec.params.len()),
        ));
    }
    for (name, param) in &spec.params {
        let field = format!("params.{name}");
        check_param_name(name).map_err(|d| Violation::new(&field, d))?;
        if let Some(default) = &param.default_value {
            check_param_value(&format!("{field}.default_value"), default)?;
        }
    }
    if spec.partitions > MAX_PARTITIONS {
        return Err(Violation::new(
            "partitions",
            format!("{} is more than {MAX_PARTITIONS}", spec.partitions),
        ));
    }
    if spec.stages.is_empty() {
        return Err(Violation::new(
            "stages",
            "a pipeline needs at least one stage",
        ));
    }
    if spec.stages.len() > MAX_STAGES {
        return Err(Violation::new(
            "stages",
            format!("{} stages, more than {MAX_STAGES}", spec.stages.len()),
        ));
    }
    let mut stage_names = HashSet::new();
    for (s, stage) in spec.stages.iter().enumerate() {
        let at = |rest: &str| format!("stages[{s}]{rest}");
        check_name(&stage.name).map_err(|d| Violation::new(at(".name"), d))?;
        if !stage_names.insert(stage.name.as_str()) {
            return Err(Violation::new(
                at(".name"),
                format!("{:?} names two stages", stage.name),
            ));
        }
        check_priority(&at(".priority"), stage.priority)?;
        if stage.jobs.is_empty() {
            return Err(Violation::new(
                at(".jobs"),
                "a stage needs at least one job",
            ));
        }
        if stage.jobs.len() > MAX_JOBS_PER_STAGE {
            return Err(Violation::new(
                at(".jobs"),
                format!("{} jobs, more than {MAX_JOBS_PER_STAGE}", stage.jobs.len()),
            ));
        }
        let mut job_names = HashSet::new();
        for (j, job) in stage.jobs.iter().enumerate() {
            let at = |rest: &str| format!("stages[{s}].jobs[{j}]{rest}");
            check_name(&job.name).map_err(|d| Violation::new(at(".name"), d))?;
            if !job_names.insert(job.name.as_str()) {
                return Err(Violation::new(
                    at(".name"),
                    format!("{:?} names two jobs of this stage", job.name),
                ));
            }
            check_name(&job.executor).map_err(|d| Violation::new(at(".executor"), d))?;
            match JobKind::try_from(job.kind) {
                Ok(JobKind::Unspecified | JobKind::Shell) => {}
                Ok(kind) => {
                    return Err(Violation::new(
                        at(".kind"),
                        format!(
                            "{} jobs are not run by this version; use Shell",
                            kind.as_str_name()
                        ),
                    ));
                }
                Err(_) => {
                    return Err(Violation::new(
                        at(".kind"),
                        format!("{} is not a job kind", job.kind),
                    ));
                }
            }
            check_priority(&at(".priority"), job.priority)?;
            check_timeout(&at(".timeout_seconds"), job.timeout_seconds)?;
            if job.retries > MAX_RETRIES {
                return Err(Violation::new(
                    at(".retries"),
                    format!("{} is more than {MAX_RETRIES}", job.retries),
                ));
            }
            if job.params.len() > MAX_PARAMS {
                return Err(Violation::new(
                    at(".params"),
                    format!("{} parameters, more than {MAX_PARAMS}", job.params.len()),
                ));
            }
            for (name, value) in &job.params {
                let field = at(&format!(".params.{name}"));
                check_param_name(name).map_err(|d| Violation::new(&field, d))?;
                check_param_value(&field, value)?;
            }
            if job.commands.is_empty() {
                return Err(Violation::new(
                    at(".commands"),
                    "a job needs at least one command",
                ));
            }
            if job.commands.len() > MAX_COMMANDS_PER_JOB {
                return Err(Violation::new(
                    at(".commands"),
                    format!(
                        "{} commands, more than {MAX_COMMANDS_PER_JOB}",
                        job.commands.len()
                    ),
                ));
            }
            for (c, command) in job.commands.iter().enumerate() {
                let field = at(&format!(".commands[{c}]"));
                if command.trim().is_empty() {
                    return Err(Violation::new(field, "a command must not be empty"));
                }
                if command.len() > MAX_COMMAND_BYTES {
                    return Err(Violation::new(
                        field,
                        format!("{} bytes, more than {MAX_COMMAND_BYTES}", command.len()),
                    ));
                }
                if command.contains('\0') {
                    return Err(Violation::new(field, "must not contain NUL"));
                }
                for name in references(command) {
                    if !spec.params.contains_key(name) && !job.params.contains_key(name) {
                        return Err(Violation::new(
                            field,
                            format!("uses {{{{{name}}}}}, which is not a declared parameter"),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The `page_size` and `page_token` of a List call, the same rule for every service: returns
/// the page size to use. Tokens are ids this server handed out, never paths.
pub fn check_page(page_size: u32, page_token: &str) -> Result<usize, Violation> {
    if page_size > MAX_PAGE_SIZE {
        return Err(Violation::new(
            "page_size",
            format!("{page_size} is more than {MAX_PAGE_SIZE}"),
        ));
    }
    if page_token.contains('/') || page_token.len() > 128 {
        return Err(Violation::new(
            "page_token",
            "not a token this server issued",
        ));
    }
    Ok(if page_size == 0 {
        DEFAULT_PAGE_SIZE
    } else {
        page_size
    } as usize)
}

/// A display name: free text, bounded (it is stored with its resource and listed with it).
pub fn check_display_name(field: &str, value: &str) -> Result<(), Violation> {
    if value.len() > MAX_DISPLAY_NAME_BYTES {
        return Err(Violation::new(
            field,
            format!("{} bytes, more than {MAX_DISPLAY_NAME_BYTES}", value.len()),
        ));
    }
    Ok(())
}

/// A task's input document: bounded, and writable as JSON (no NaN or infinite number).
pub fn check_input(field: &str, input: Option<&prost_types::Value>) -> Result<(), Violation> {
    let Some(input) = input else {
        return Ok(());
    };
    let len = prost::Message::encoded_len(input);
    if len > MAX_INPUT_BYTES {
        return Err(Violation::new(
            field,
            format!("{len} bytes, more than {MAX_INPUT_BYTES}"),
        ));
    }
    if pm_proto::json::to_json(input).is_none() {
        return Err(Violation::new(
            field,
            "holds a number JSON cannot write (NaN or infinity)",
        ));
    }
    Ok(())
}

/// A parameter value: bounded, no NUL (it could not be passed to a process).
pub fn check_param_value(field: &str, value: &str) -> Result<(), Violation> {
    if value.len() > MAX_PARAM_VALUE_BYTES {
        return Err(Violation::new(
            field,
            format!("{} bytes, more than {MAX_PARAM_VALUE_BYTES}", value.len()),
        ));
    }
    if value.contains('\0') {
        return Err(Violation::new(field, "must not contain NUL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use pm_proto::v1::{Job, ParamSpec, Stage};

    use super::*;

    fn spec() -> PipelineSpec {
        PipelineSpec {
            params: [("url".to_owned(), ParamSpec::default())].into(),
            stages: vec![Stage {
                name: "s".into(),
                jobs: vec![Job {
                    name: "j".into(),
                    executor: "host".into(),
                    commands: vec!["echo {{url}}".into()],
                    ..Job::default()
                }],
                priority: None,
            }],
            ..PipelineSpec::default()
        }
    }

    #[test]
    fn list_pages_are_bounded_and_tokens_are_not_paths() {
        assert_eq!(check_page(0, ""), Ok(DEFAULT_PAGE_SIZE as usize));
        assert_eq!(check_page(MAX_PAGE_SIZE, "abc"), Ok(MAX_PAGE_SIZE as usize));
        assert_eq!(
            check_page(MAX_PAGE_SIZE + 1, "").unwrap_err().field,
            "page_size"
        );
        assert_eq!(check_page(10, "../x").unwrap_err().field, "page_token");
        assert_eq!(
            check_page(10, &"a".repeat(129)).unwrap_err().field,
            "page_token"
        );
    }

    #[test]
    fn each_rule_names_its_field() {
        assert_eq!(validate(&spec()), Ok(()));
        let field = |f: fn(&mut PipelineSpec)| {
            let mut s = spec();
            f(&mut s);
            validate(&s).unwrap_err().field
        };
        assert_eq!(field(|s| s.stages.clear()), "stages");
        assert_eq!(
            field(|s| s.stages[0].jobs[0].commands.clear()),
            "stages[0].jobs[0].commands"
        );
        assert_eq!(
            field(|s| s.stages[0].jobs[0].commands[0] = " ".into()),
            "stages[0].jobs[0].commands[0]"
        );
        assert_eq!(
            field(|s| s.stages[0].jobs[0].commands[0] = "echo {{nope}}".into()),
            "stages[0].jobs[0].commands[0]"
        );
        assert_eq!(
            field(|s| s.stages[0].jobs[0].priority = Some(101)),
            "stages[0].jobs[0].priority"
        );
        assert_eq!(
            field(|s| s.stages[0].priority = Some(1000)),
            "stages[0].priority"
        );
        assert_eq!(
            field(|s| s.stages[0].jobs[0].executor = "a b".into()),
            "stages[0].jobs[0].executor"
        );
        assert_eq!(
            field(|s| s.stages[0].jobs[0].kind = JobKind::K8sJob as i32),
            "stages[0].jobs[0].kind"
        );
        assert_eq!(
            field(|s| {
                let dup = s.stages[0].clone();
                s.stages.push(dup)
            }),
            "stages[1].name"
        );
        assert_eq!(
            field(|s| {
                let p = s.params.remove("url").unwrap();
                s.params.insert("bad-name".into(), p);
            }),
            "params.bad-name"
        );
        assert_eq!(
            field(|s| s.stages[0].jobs[0].timeout_seconds = u32::MAX),
            "stages[0].jobs[0].timeout_seconds"
        );
    }
}
