//! What a token says about its holder: the tenant, the client, its roles, its dispatch
//! priority and, for agents, the pipelines it may serve.

use serde::{Deserialize, Serialize};

/// A client's role (the wire's `pm.v1.Role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    PlatformAdmin,
    TenantAdmin,
    Submitter,
    Viewer,
    Agent,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::PlatformAdmin,
        Role::TenantAdmin,
        Role::Submitter,
        Role::Viewer,
        Role::Agent,
    ];

    pub fn from_wire(role: i32) -> Option<Role> {
        use pm_proto::v1::Role as W;
        Some(match W::try_from(role).ok()? {
            W::PlatformAdmin => Role::PlatformAdmin,
            W::TenantAdmin => Role::TenantAdmin,
            W::Submitter => Role::Submitter,
            W::Viewer => Role::Viewer,
            W::Agent => Role::Agent,
            W::Unspecified => return None,
        })
    }

    pub fn to_wire(self) -> pm_proto::v1::Role {
        use pm_proto::v1::Role as W;
        match self {
            Role::PlatformAdmin => W::PlatformAdmin,
            Role::TenantAdmin => W::TenantAdmin,
            Role::Submitter => W::Submitter,
            Role::Viewer => W::Viewer,
            Role::Agent => W::Agent,
        }
    }

    /// The name used in tokens and on pmctl's command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::PlatformAdmin => "platform-admin",
            Role::TenantAdmin => "tenant-admin",
            Role::Submitter => "submitter",
            Role::Viewer => "viewer",
            Role::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A token's claims (a JWT's payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Always [`crate::ISSUER`].
    pub iss: String,
    /// The client's resource name, `tenants/{t}/clients/{c}`.
    pub sub: String,
    /// The client's tenant: everything but a platform admin is confined to it.
    pub tenant: String,
    pub roles: Vec<Role>,
    /// The client's dispatch priority (smaller first), from its record.
    pub priority: u32,
    /// For agents: the pipelines they may serve.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pipelines: Vec<String>,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
}

impl Claims {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    pub fn is_platform_admin(&self) -> bool {
        self.has(Role::PlatformAdmin)
    }
}
