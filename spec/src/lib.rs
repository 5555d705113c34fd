//! Pipeline specs, shared by every component that reads them.
//!
//! - [`document`] loads a YAML or JSON document in any of the three accepted forms (staged,
//!   the seed's flat `pipeline` list, the task-pipeline form) into one structured
//!   [`PipelineSpec`].
//! - [`validate`] checks a structured spec against the limits and naming rules.
//! - [`template`] resolves a task's parameters and renders `{{name}}` references shell-quoted,
//!   so a parameter value can never become shell syntax.

pub mod document;
pub mod template;
pub mod validate;

use std::fmt;

pub use pm_proto::v1::PipelineSpec;

pub use document::parse_document;
pub use template::{ResolvedParams, env_name, render, resolve_params};
pub use validate::validate;

/// The content address of a spec: SHA-256 of its encoding. Gateways and shards agree on it,
/// so a task can name its spec instead of carrying it.
pub type SpecId = [u8; 32];

pub fn spec_id(spec: &PipelineSpec) -> SpecId {
    use prost::Message;
    use sha2::Digest;
    sha2::Sha256::digest(spec.encode_to_vec()).into()
}

/// A problem with one field of the input: the path of the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Violation {
    /// Dotted path, e.g. `stages[0].jobs[1].commands`.
    pub field: String,
    /// Lowercase, one line, no trailing period.
    pub description: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }

    /// The same violation under an outer field, e.g. `spec` + `stages[0]` = `spec.stages[0]`.
    pub fn under(mut self, outer: &str) -> Self {
        self.field = match (outer.is_empty(), self.field.is_empty()) {
            (true, _) => self.field,
            (false, true) => outer.to_owned(),
            (false, false) if self.field.starts_with('[') => format!("{outer}{}", self.field),
            (false, false) => format!("{outer}.{}", self.field),
        };
        self
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.description)
        } else {
            write!(f, "{}: {}", self.field, self.description)
        }
    }
}

/// Limits on what a spec or a task may carry.
pub mod limits {
    /// Stages in a pipeline.
    pub const MAX_STAGES: usize = 64;
    /// Jobs in one stage.
    pub const MAX_JOBS_PER_STAGE: usize = 64;
    /// Commands in one job.
    pub const MAX_COMMANDS_PER_JOB: usize = 256;
    /// Bytes in one command (before substitution).
    pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
    /// Parameters declared by a pipeline or passed by a task.
    pub const MAX_PARAMS: usize = 64;
    /// Bytes in one parameter value.
    pub const MAX_PARAM_VALUE_BYTES: usize = 64 * 1024;
    /// Bytes in a name (stage, job, executor, parameter).
    pub const MAX_NAME_BYTES: usize = 63;
    /// Largest priority; smaller runs first.
    pub const MAX_PRIORITY: u32 = 100;
    /// Priority when none is given (the task-pipeline design's convention).
    pub const DEFAULT_PRIORITY: u32 = 10;
    /// Extra attempts of one job.
    pub const MAX_RETRIES: u32 = 100;
    /// Longest job or task timeout: one week.
    pub const MAX_TIMEOUT_SECONDS: u32 = 7 * 24 * 3600;
    /// Ring keys of one pipeline.
    pub const MAX_PARTITIONS: u32 = 1024;
    /// Bytes of a spec document.
    pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
    /// Bytes of a task's input document, encoded.
    pub const MAX_INPUT_BYTES: usize = 64 * 1024;
    /// Items of a list page when the request gives no `page_size`.
    pub const DEFAULT_PAGE_SIZE: u32 = 100;
    /// Most items of one list page.
    pub const MAX_PAGE_SIZE: u32 = 1000;
    /// Bytes of a tenant's, application's or client's display name.
    pub const MAX_DISPLAY_NAME_BYTES: usize = 256;
}

/// A spec as a request carries it, its implicit parameters declared
/// ([`template::declare_implicit_params`]), validated; violations are reported under `field`.
pub fn load_structured(mut spec: PipelineSpec, field: &str) -> Result<PipelineSpec, Violation> {
    template::declare_implicit_params(&mut spec);
    validate(&spec).map_err(|v| v.under(field))?;
    Ok(spec)
}

/// A spec document (any accepted form) loaded as [`load_structured`] loads a spec.
pub fn load_document(document: &str, field: &str) -> Result<PipelineSpec, Violation> {
    let spec = parse_document(document).map_err(|v| v.under(field))?;
    load_structured(spec, field)
}
