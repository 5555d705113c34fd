//! The authorization table: which role may make which call, in which tenant. It is the one
//! place that says so; every handler asks [`authorize`] with its [`Rpc`] and the tenant of
//! the resource the request names, before it does anything.
//!
//! - A platform admin may do everything, in every tenant.
//! - Everyone else acts only in the tenant of their token; another tenant's resource is
//!   PERMISSION_DENIED, as is a call their roles do not allow.
//! - Lists show only what the caller may see (handlers narrow them).

use tonic::Status;

use pm_auth::Role;

use crate::auth::Caller;

/// Every RPC the gateway serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    CreateTenant,
    GetTenant,
    ListTenants,
    DeleteTenant,
    CreateClient,
    ListClients,
    DeleteClient,
    CreateApplication,
    GetApplication,
    ListApplications,
    DeleteApplication,
    ApplyPipeline,
    GetPipeline,
    ListPipelines,
    DeletePipeline,
    GetPipelineStats,
    SubmitTask,
    SubmitTasks,
    GetTask,
    WatchTask,
    CancelTask,
    ListTasks,
    IssueToken,
    Connect,
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Anyone, with or without a token.
    Anyone,
    /// A platform admin.
    PlatformAdmin,
    /// Managing a tenant's clients, applications and pipelines.
    TenantAdmin,
    /// Submitting and cancelling tasks.
    Submit,
    /// Reading applications, pipelines and tasks.
    Read,
    /// An agent's stream.
    Agent,
}

impl Rpc {
    pub const ALL: [Rpc; 24] = [
        Rpc::CreateTenant,
        Rpc::GetTenant,
        Rpc::ListTenants,
        Rpc::DeleteTenant,
        Rpc::CreateClient,
        Rpc::ListClients,
        Rpc::DeleteClient,
        Rpc::CreateApplication,
        Rpc::GetApplication,
        Rpc::ListApplications,
        Rpc::DeleteApplication,
        Rpc::ApplyPipeline,
        Rpc::GetPipeline,
        Rpc::ListPipelines,
        Rpc::DeletePipeline,
        Rpc::GetPipelineStats,
        Rpc::SubmitTask,
        Rpc::SubmitTasks,
        Rpc::GetTask,
        Rpc::WatchTask,
        Rpc::CancelTask,
        Rpc::ListTasks,
        Rpc::IssueToken,
        Rpc::Connect,
    ];

    /// The table.
    pub fn need(self) -> Need {
        use Rpc::*;
        match self {
            IssueToken => Need::Anyone,
            CreateTenant | DeleteTenant => Need::PlatformAdmin,
            // Granting ROLE_PLATFORM_ADMIN also takes a platform admin (see `config`).
            CreateClient | ListClients | DeleteClient => Need::TenantAdmin,
            CreateApplication | DeleteApplication | ApplyPipeline | DeletePipeline => {
                Need::TenantAdmin
            }
            // ListTenants shows a tenant only its own record.
            GetTenant | ListTenants => Need::Read,
            GetApplication | ListApplications | GetPipeline | ListPipelines => Need::Read,
            GetPipelineStats => Need::Read,
            GetTask | WatchTask | ListTasks => Need::Read,
            SubmitTask | SubmitTasks | CancelTask => Need::Submit,
            // Scoped further to the agent's pipelines (see `agents`).
            Connect => Need::Agent,
        }
    }
}

/// Whether `role` meets `need` (in its own tenant).
fn grants(role: Role, need: Need) -> bool {
    match role {
        Role::PlatformAdmin => true,
        Role::TenantAdmin => matches!(
            need,
            Need::Anyone | Need::TenantAdmin | Need::Submit | Need::Read
        ),
        Role::Submitter => matches!(need, Need::Anyone | Need::Submit | Need::Read),
        Role::Viewer => matches!(need, Need::Anyone | Need::Read),
        Role::Agent => matches!(need, Need::Anyone | Need::Agent),
    }
}

/// Whether `caller` may make `rpc` on a resource of `tenant`. PERMISSION_DENIED says why.
/// `None` checks the role only: for calls on no single tenant (ListTenants, narrowed by its
/// handler), and for names too malformed to name one, which their handler refuses as
/// INVALID_ARGUMENT naming the field before touching anything.
#[allow(clippy::result_large_err)]
pub fn authorize(caller: &Caller, rpc: Rpc, tenant: Option<&str>) -> Result<(), Status> {
    let need = rpc.need();
    let claims = match caller {
        Caller::Open => return Ok(()),
        _ if need == Need::Anyone => return Ok(()),
        Caller::Token(claims) => claims,
    };
    if claims.is_platform_admin() {
        return Ok(());
    }
    if !claims.roles.iter().any(|r| grants(*r, need)) {
        return Err(Status::permission_denied(format!(
            "{rpc:?} needs {}; {} has {}",
            needed_roles(need),
            claims.sub,
            claims
                .roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if let Some(tenant) = tenant
        && tenant != claims.tenant
    {
        return Err(Status::permission_denied(format!(
            "{} of tenant {} may not act in tenant {tenant}",
            claims.sub, claims.tenant
        )));
    }
    Ok(())
}

fn needed_roles(need: Need) -> String {
    Role::ALL
        .into_iter()
        .filter(|r| grants(*r, need))
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// The caller of `request`, if it may make `rpc` on the resource `name` names.
#[allow(clippy::result_large_err)]
pub fn check<T>(request: &tonic::Request<T>, rpc: Rpc, name: &str) -> Result<Caller, Status> {
    let caller = Caller::of(request)?;
    authorize(&caller, rpc, tenant_of(name))?;
    Ok(caller)
}

/// The tenant a resource name (`tenants/{t}/...`) belongs to; `None` when it names none
/// (then every parser downstream refuses it too).
pub fn tenant_of(name: &str) -> Option<&str> {
    name.strip_prefix("tenants/")
        .and_then(|rest| rest.split('/').next())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_of_takes_the_first_segment_or_nothing() {
        assert_eq!(tenant_of("tenants/a"), Some("a"));
        assert_eq!(tenant_of("tenants/a/applications/b/pipelines/c"), Some("a"));
        assert_eq!(tenant_of("tenants//x"), None);
        assert_eq!(tenant_of("tenant/a"), None);
        assert_eq!(tenant_of(""), None);
    }
}
