//! The key layout under `/pm/v1/`. Each collection has its own prefix, so listing one never
//! walks another's keys.

use pm_proto::names::{ApplicationName, ClientName, PipelineName, TenantName};

pub const TENANTS: &str = "/pm/v1/tenants/";
pub const CLIENTS: &str = "/pm/v1/clients/";
pub const CLIENT_IDS: &str = "/pm/v1/client-ids/";
pub const APPLICATIONS: &str = "/pm/v1/applications/";
pub const PIPELINES: &str = "/pm/v1/pipelines/";
pub const PIPELINE_VERSIONS: &str = "/pm/v1/pipeline-versions/";
pub const SIGNING_KEYS: &str = "/pm/v1/signing-keys/";
/// Set once, by the first platform admin's creation.
pub const BOOTSTRAP_ADMIN: &str = "/pm/v1/bootstrap-admin";

/// Creation time first, zero-padded, so key order is age order.
pub fn signing_key(create_time_ms: i64, kid: &str) -> String {
    format!("{SIGNING_KEYS}{create_time_ms:020}-{kid}")
}

pub fn tenant(n: &TenantName) -> String {
    format!("{TENANTS}{}", n.tenant)
}

pub fn clients_of(n: &TenantName) -> String {
    format!("{CLIENTS}{}/", n.tenant)
}

pub fn client(n: &ClientName) -> String {
    format!("{CLIENTS}{}/{}", n.tenant, n.client)
}

pub fn client_id(id: &str) -> String {
    format!("{CLIENT_IDS}{id}")
}

pub fn applications_of(n: &TenantName) -> String {
    format!("{APPLICATIONS}{}/", n.tenant)
}

pub fn application(n: &ApplicationName) -> String {
    format!("{APPLICATIONS}{}/{}", n.tenant, n.application)
}

pub fn pipelines_of(n: &ApplicationName) -> String {
    format!("{PIPELINES}{}/{}/", n.tenant, n.application)
}

/// Every pipeline of a tenant, over its applications.
pub fn pipelines_of_tenant(n: &TenantName) -> String {
    format!("{PIPELINES}{}/", n.tenant)
}

pub fn pipeline(n: &PipelineName) -> String {
    format!("{PIPELINES}{}/{}/{}", n.tenant, n.application, n.pipeline)
}

pub fn pipeline_versions_of(n: &PipelineName) -> String {
    format!(
        "{PIPELINE_VERSIONS}{}/{}/{}/",
        n.tenant, n.application, n.pipeline
    )
}

/// Zero-padded so key order is version order.
pub fn pipeline_version(n: &PipelineName, version: u64) -> String {
    format!("{}{version:020}", pipeline_versions_of(n))
}

/// The id at the end of a key (the part after the prefix).
pub fn last_segment(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}
