//! Spec documents: YAML or JSON, in one of three forms, all loaded into [`PipelineSpec`].
//!
//! 1. **Staged** (the design's): `stages: [{name, jobs: [{name, executor, commands, ...}]}]`.
//! 2. **Flat** (the seed's task form): `{"pipeline": [{"executorName": .., "commands": [..]}]}`;
//!    each element becomes a stage of one job.
//! 3. **Task-pipeline**: `stages` as a list of names and a flat `jobs` list whose items name
//!    their `stage` and may carry `kind`, `version`, `priority`, `params`, `retry_attempt`,
//!    `allow_failure` and `timeout` (seconds).
//!
//! Unknown keys are errors, not silently dropped: a typo in `allow_failure` must not go
//! unnoticed. Errors carry the path of the offending key in the document.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use pm_proto::v1::{Job, JobKind, ParamSpec, PipelineSpec, Stage};

use crate::Violation;
use crate::limits::MAX_DOCUMENT_BYTES;

/// Executor used when a document names none: the agent's own host.
pub const DEFAULT_EXECUTOR: &str = "host";

/// Loads a document in any accepted form. The result still has to pass [`crate::validate`].
pub fn parse_document(text: &str) -> Result<PipelineSpec, Violation> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(Violation::new(
            "",
            format!(
                "document is {} bytes, more than {MAX_DOCUMENT_BYTES}",
                text.len()
            ),
        ));
    }
    let value: Value = serde_yaml_ng::from_str(text)
        .map_err(|e| Violation::new("", format!("not YAML or JSON: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(Violation::new("", "the document must be a mapping"));
    };
    if map.contains_key("pipeline") {
        from_value::<FlatDoc>(value).map(FlatDoc::into_spec)
    } else if map.contains_key("jobs")
        || map
            .get("stages")
            .and_then(Value::as_array)
            .is_some_and(|stages| stages.iter().any(Value::is_string))
    {
        from_value::<TaskPipelineDoc>(value)?.into_spec()
    } else {
        from_value::<StagedDoc>(value)?.into_spec()
    }
}

fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, Violation> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        Violation::new(field, e.into_inner().to_string())
    })
}

/// A scalar written in YAML as a string, number or boolean; kept as its text.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

impl Scalar {
    fn into_text(self) -> String {
        match self {
            Scalar::Text(s) => s,
            Scalar::Integer(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }
    }
}

/// A duration as seconds (`30`) or human text (`30s`, `2m`, `1h30m`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Timeout {
    Seconds(u32),
    Text(String),
}

impl Timeout {
    fn seconds(self, field: &str) -> Result<u32, Violation> {
        match self {
            Timeout::Seconds(s) => Ok(s),
            Timeout::Text(text) => humantime::parse_duration(&text)
                .ok()
                .and_then(|d| u32::try_from(d.as_secs()).ok())
                .ok_or_else(|| {
                    Violation::new(
                        field,
                        format!("{text:?} is not a duration (use seconds or e.g. 30s, 5m, 1h)"),
                    )
                }),
        }
    }
}

/// A declared parameter: `{required, default, description}` or just a default value.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ParamDoc {
    Full(ParamFields),
    Default(Scalar),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamFields {
    #[serde(default)]
    required: bool,
    #[serde(default)]
    default: Option<Scalar>,
    #[serde(default)]
    description: String,
}

fn params_into_spec(params: BTreeMap<String, ParamDoc>) -> HashMap<String, ParamSpec> {
    params
        .into_iter()
        .map(|(name, doc)| {
            let spec = match doc {
                ParamDoc::Full(f) => ParamSpec {
                    required: f.required,
                    default_value: f.default.map(Scalar::into_text),
                    description: f.description,
                },
                ParamDoc::Default(value) => ParamSpec {
                    required: false,
                    default_value: Some(value.into_text()),
                    description: String::new(),
                },
            };
            (name, spec)
        })
        .collect()
}

fn job_kind(kind: Option<&str>, field: &str) -> Result<JobKind, Violation> {
    match kind.map(str::to_ascii_lowercase).as_deref() {
        None | Some("shell") => Ok(JobKind::Shell),
        Some("k8s/job") => Ok(JobKind::K8sJob),
        Some("k8s/deployment") => Ok(JobKind::K8sDeployment),
        Some(_) => Err(Violation::new(
            field,
            format!(
                "{:?} is not a job kind (Shell, K8S/Job, K8S/Deployment)",
                kind.unwrap_or_default()
            ),
        )),
    }
}

fn scalars_into_text(params: BTreeMap<String, Scalar>) -> HashMap<String, String> {
    params
        .into_iter()
        .map(|(k, v)| (k, v.into_text()))
        .collect()
}

// ---- form 1: staged ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StagedDoc {
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    params: BTreeMap<String, ParamDoc>,
    stages: Vec<StagedStage>,
    #[serde(default, alias = "allowInlineTasks")]
    allow_inline_tasks: bool,
    #[serde(default)]
    partitions: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StagedStage {
    name: String,
    jobs: Vec<StagedJob>,
    #[serde(default)]
    priority: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StagedJob {
    name: String,
    #[serde(default, alias = "executorName")]
    executor: Option<String>,
    commands: Vec<String>,
    #[serde(default)]
    timeout: Option<Timeout>,
    #[serde(default, alias = "retry_attempt")]
    retries: u32,
    #[serde(default)]
    allow_failure: bool,
    #[serde(default)]
    priority: Option<u32>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    version: String,
    #[serde(default)]
    params: BTreeMap<String, Scalar>,
}

impl StagedDoc {
    fn into_spec(self) -> Result<PipelineSpec, Violation> {
        let mut stages = Vec::with_capacity(self.stages.len());
        for (s, stage) in self.stages.into_iter().enumerate() {
            let mut jobs = Vec::with_capacity(stage.jobs.len());
            for (j, job) in stage.jobs.into_iter().enumerate() {
                jobs.push(job.into_job(&format!("stages[{s}].jobs[{j}]"))?);
            }
            stages.push(Stage {
                name: stage.name,
                priority: stage.priority,
                jobs,
            });
        }
        Ok(PipelineSpec {
            name: self.name,
            description: self.description,
            params: params_into_spec(self.params),
            stages,
            allow_inline_tasks: self.allow_inline_tasks,
            partitions: self.partitions,
        })
    }
}

impl StagedJob {
    fn into_job(self, path: &str) -> Result<Job, Violation> {
        let timeout_seconds = match self.timeout {
            None => 0,
            Some(t) => t.seconds(&format!("{path}.timeout"))?,
        };
        Ok(Job {
            name: self.name,
            executor: self.executor.unwrap_or_else(|| DEFAULT_EXECUTOR.to_owned()),
            commands: self.commands,
            timeout_seconds,
            retries: self.retries,
            allow_failure: self.allow_failure,
            priority: self.priority,
            kind: job_kind(self.kind.as_deref(), &format!("{path}.kind"))? as i32,
            version: self.version,
            params: scalars_into_text(self.params),
        })
    }
}

// ---- form 2: the seed's flat list ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlatDoc {
    #[serde(default)]
    name: String,
    #[serde(default)]
    params: BTreeMap<String, ParamDoc>,
    pipeline: Vec<FlatStep>,
    #[serde(default, alias = "allowInlineTasks")]
    allow_inline_tasks: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlatStep {
    #[serde(rename = "executorName", alias = "executor")]
    executor_name: String,
    commands: Vec<String>,
}

impl FlatDoc {
    fn into_spec(self) -> PipelineSpec {
        PipelineSpec {
            name: self.name,
            params: params_into_spec(self.params),
            stages: self
                .pipeline
                .into_iter()
                .enumerate()
                .map(|(i, step)| Stage {
                    name: format!("step-{}", i + 1),
                    jobs: vec![Job {
                        name: step.executor_name.clone(),
                        executor: step.executor_name,
                        commands: step.commands,
                        ..Job::default()
                    }],
                    priority: None,
                })
                .collect(),
            allow_inline_tasks: self.allow_inline_tasks,
            ..PipelineSpec::default()
        }
    }
}

// ---- form 3: task-pipeline ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskPipelineDoc {
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    params: BTreeMap<String, ParamDoc>,
    stages: Vec<String>,
    jobs: Vec<TaskPipelineJob>,
    #[serde(default, alias = "allowInlineTasks")]
    allow_inline_tasks: bool,
    #[serde(default)]
    partitions: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskPipelineJob {
    name: String,
    stage: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default, alias = "executorName")]
    executor: Option<String>,
    #[serde(default, alias = "script")]
    commands: Vec<String>,
    #[serde(default)]
    version: String,
    #[serde(default)]
    priority: Option<u32>,
    #[serde(default)]
    params: BTreeMap<String, Scalar>,
    #[serde(default, alias = "retries")]
    retry_attempt: u32,
    #[serde(default)]
    allow_failure: bool,
    /// Seconds, the task-pipeline convention; human text is accepted too.
    #[serde(default)]
    timeout: Option<Timeout>,
}

impl TaskPipelineDoc {
    fn into_spec(self) -> Result<PipelineSpec, Violation> {
        let mut stages: Vec<Stage> = self
            .stages
            .iter()
            .map(|name| Stage {
                name: name.clone(),
                ..Stage::default()
            })
            .collect();
        for (i, job) in self.jobs.into_iter().enumerate() {
            let field = |name: &str| format!("jobs[{i}].{name}");
            let Some(stage) = stages.iter_mut().find(|s| s.name == job.stage) else {
                return Err(Violation::new(
                    field("stage"),
                    format!(
                        "{:?} is not one of the stages ({})",
                        job.stage,
                        self.stages.join(", ")
                    ),
                ));
            };
            let timeout_seconds = match job.timeout {
                None => 0,
                Some(t) => t.seconds(&field("timeout"))?,
            };
            stage.jobs.push(Job {
                name: job.name,
                executor: job.executor.unwrap_or_else(|| DEFAULT_EXECUTOR.to_owned()),
                commands: job.commands,
                timeout_seconds,
                retries: job.retry_attempt,
                allow_failure: job.allow_failure,
                priority: job.priority,
                kind: job_kind(job.kind.as_deref(), &field("kind"))? as i32,
                version: job.version,
                params: scalars_into_text(job.params),
            });
        }
        Ok(PipelineSpec {
            name: self.name,
            description: self.description,
            params: params_into_spec(self.params),
            stages,
            allow_inline_tasks: self.allow_inline_tasks,
            partitions: self.partitions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAGED: &str = r#"
name: ocr
params:
  url: { required: true }
  lang: eng
stages:
  - name: fetch
    jobs:
      - { name: download, executor: wget, commands: ["wget -O image.png {{url}}"], timeout: 30s, retries: 2 }
  - name: recognize
    jobs:
      - { name: ocr, executor: tesseract, commands: ["tesseract image.png result", "cat result.txt"] }
"#;

    #[test]
    fn staged_form_loads_every_field() {
        let spec = parse_document(STAGED).unwrap();
        assert_eq!(spec.name, "ocr");
        assert!(spec.params["url"].required);
        assert_eq!(spec.params["lang"].default_value.as_deref(), Some("eng"));
        assert_eq!(spec.stages.len(), 2);
        let download = &spec.stages[0].jobs[0];
        assert_eq!(download.executor, "wget");
        assert_eq!(download.timeout_seconds, 30);
        assert_eq!(download.retries, 2);
        assert_eq!(spec.stages[1].jobs[0].commands.len(), 2);
        assert_eq!(crate::validate(&spec), Ok(()));
    }

    #[test]
    fn flat_seed_form_becomes_one_job_stages() {
        let spec = parse_document(
            r#"{"pipeline":[{"executorName":"wget","commands":["wget x"]},{"executorName":"tesseract","commands":["a","b"]}]}"#,
        )
        .unwrap();
        assert_eq!(spec.stages.len(), 2);
        assert_eq!(spec.stages[1].name, "step-2");
        assert_eq!(spec.stages[1].jobs[0].executor, "tesseract");
        assert_eq!(spec.stages[1].jobs[0].commands, vec!["a", "b"]);
        assert_eq!(crate::validate(&spec), Ok(()));
    }

    #[test]
    fn task_pipeline_form_groups_jobs_by_stage() {
        let spec = parse_document(
            r#"
name: build
stages: [compile, test]
jobs:
  - { name: unit, stage: test, commands: ["make test"], priority: 3, retry_attempt: 2, timeout: 60, allow_failure: true }
  - { name: cc, stage: compile, kind: Shell, version: "1.2", commands: ["make"], params: { opt: 2 } }
"#,
        )
        .unwrap();
        assert_eq!(spec.stages[0].name, "compile");
        assert_eq!(spec.stages[0].jobs[0].name, "cc");
        assert_eq!(spec.stages[0].jobs[0].params["opt"], "2");
        let unit = &spec.stages[1].jobs[0];
        assert_eq!(
            (
                unit.priority,
                unit.retries,
                unit.timeout_seconds,
                unit.allow_failure
            ),
            (Some(3), 2, 60, true)
        );
        assert_eq!(crate::validate(&spec), Ok(()));
    }

    #[test]
    fn errors_name_the_offending_key() {
        let e = parse_document("stages: [a]\njobs:\n  - { name: x, stage: b, commands: [c] }")
            .unwrap_err();
        assert_eq!(e.field, "jobs[0].stage");
        assert!(e.description.contains("\"b\""), "{e}");

        let e =
            parse_document("stages:\n  - name: s\n    jobs:\n      - { name: j, comands: [x] }")
                .unwrap_err();
        assert!(e.field.starts_with("stages[0].jobs[0]"), "{e}");
        assert!(e.description.contains("comands"), "{e}");

        let e = parse_document("stages: [a]\njobs:\n  - { name: x, stage: a, kind: Lambda }")
            .unwrap_err();
        assert_eq!(e.field, "jobs[0].kind");

        assert!(parse_document("[1, 2]").is_err());
        assert!(parse_document("{{{").is_err());
    }
}
