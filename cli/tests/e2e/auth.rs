//! `pm dev --auth` as an attacker and as each role would use it, through the generated
//! clients only: every RPC × every role × own and another tenant, tokens that are missing,
//! malformed or tampered with, agents outside their scope, a deleted client's credentials.
//! The expected outcomes are this file's own table, written from docs/security.md, not read
//! from the gateway's.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

use pm_cli::dev::{Dev, DevOptions};
use pm_gateway::authz::Rpc;
use pm_proto::client::{Bearer, Credentials};
use pm_proto::v1::*;

use super::WAIT;

/// Who calls: a role's token, or a broken credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Who {
    NoToken,
    Garbage,
    Tampered,
    PlatformAdmin,
    TenantAdmin,
    Submitter,
    Viewer,
    Agent,
}

const EVERYONE: [Who; 8] = [
    Who::NoToken,
    Who::Garbage,
    Who::Tampered,
    Who::PlatformAdmin,
    Who::TenantAdmin,
    Who::Submitter,
    Who::Viewer,
    Who::Agent,
];

/// The roles that may make `rpc` in their own tenant (a platform admin: in any).
fn allowed(rpc: Rpc) -> &'static [Who] {
    use Who::*;
    const ADMINS: &[Who] = &[PlatformAdmin, TenantAdmin];
    const READERS: &[Who] = &[PlatformAdmin, TenantAdmin, Submitter, Viewer];
    match rpc {
        Rpc::CreateTenant | Rpc::DeleteTenant => &[PlatformAdmin],
        Rpc::CreateClient | Rpc::ListClients | Rpc::DeleteClient => ADMINS,
        Rpc::CreateApplication
        | Rpc::DeleteApplication
        | Rpc::ApplyPipeline
        | Rpc::DeletePipeline => ADMINS,
        Rpc::GetTenant
        | Rpc::ListTenants
        | Rpc::GetApplication
        | Rpc::ListApplications
        | Rpc::GetPipeline
        | Rpc::ListPipelines
        | Rpc::GetPipelineStats
        | Rpc::GetTask
        | Rpc::WatchTask
        | Rpc::ListTasks => READERS,
        Rpc::SubmitTask | Rpc::SubmitTasks | Rpc::CancelTask => {
            &[PlatformAdmin, TenantAdmin, Submitter]
        }
        Rpc::Connect => &[PlatformAdmin, Agent],
        Rpc::IssueToken => &[
            NoToken,
            Garbage,
            Tampered,
            PlatformAdmin,
            TenantAdmin,
            Submitter,
            Viewer,
            Agent,
        ],
    }
}

const OWN: &str = "acme";
const OTHER: &str = "globex";

struct Fixture {
    dev: Dev,
    dir: tempfile::TempDir,
    channel: Channel,
    tokens: HashMap<Who, String>,
    /// Per role of OWN: its client's id and secret.
    clients: HashMap<Who, (String, String, Client)>,
    /// A task of each tenant (submitted by the platform admin).
    tasks: HashMap<&'static str, String>,
    serial: u32,
}

fn pipeline(tenant: &str) -> String {
    format!("tenants/{tenant}/applications/app/pipelines/p")
}

impl Fixture {
    fn bearer(&self, who: Who) -> Bearer {
        Bearer::new(self.tokens.get(&who).map(String::as_str)).unwrap()
    }

    fn tenants(
        &self,
        who: Who,
    ) -> tenant_service_client::TenantServiceClient<pm_proto::client::AuthedChannel> {
        pm_proto::client::tenants_with(self.channel.clone(), self.bearer(who))
    }

    fn pipelines(
        &self,
        who: Who,
    ) -> pipeline_service_client::PipelineServiceClient<pm_proto::client::AuthedChannel> {
        pm_proto::client::pipelines_with(self.channel.clone(), self.bearer(who))
    }

    fn tasks(
        &self,
        who: Who,
    ) -> task_service_client::TaskServiceClient<pm_proto::client::AuthedChannel> {
        pm_proto::client::tasks_with(self.channel.clone(), self.bearer(who))
    }

    async fn issue(&self, id: &str, secret: &str) -> Result<String, tonic::Status> {
        pm_proto::client::auth(self.channel.clone())
            .issue_token(IssueTokenRequest {
                client_id: id.into(),
                client_secret: secret.into(),
            })
            .await
            .map(|r| r.into_inner().access_token)
    }

    async fn start() -> Fixture {
        Self::start_with(pm_gateway::watch::DEFAULT_MAX_WATCHES_PER_CLIENT).await
    }

    async fn start_with(max_watches_per_client: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let dev = Dev::start(DevOptions {
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".into(),
            sample: false,
            slots: 4,
            auth: true,
            work_dir_at: None,
            max_watches_per_client,
        })
        .await
        .unwrap();
        let channel = pm_proto::client::channel(&dev.endpoint()).unwrap();
        let mut f = Fixture {
            dir,
            channel,
            tokens: HashMap::new(),
            clients: HashMap::new(),
            tasks: HashMap::new(),
            serial: 0,
            dev,
        };
        let Some(Credentials::Client { id, secret }) = f.dev.admin.clone() else {
            panic!("pm dev --auth has a platform admin")
        };
        let admin = f.issue(&id, &secret).await.unwrap();
        f.tokens.insert(Who::PlatformAdmin, admin);
        for tenant in [OWN, OTHER] {
            f.tenants(Who::PlatformAdmin)
                .create_tenant(CreateTenantRequest {
                    tenant_id: tenant.into(),
                    tenant: None,
                })
                .await
                .unwrap();
            f.pipelines(Who::PlatformAdmin)
                .create_application(CreateApplicationRequest {
                    parent: format!("tenants/{tenant}"),
                    application_id: "app".into(),
                    application: None,
                })
                .await
                .unwrap();
            f.pipelines(Who::PlatformAdmin)
                .apply_pipeline(ApplyPipelineRequest {
                    parent: format!("tenants/{tenant}/applications/app"),
                    pipeline_id: "p".into(),
                    source: Some(apply_pipeline_request::Source::SpecDocument(
                        "stages: [{name: s, jobs: [{name: j, commands: [\"true\"]}]}]".into(),
                    )),
                })
                .await
                .unwrap();
            let task = f
                .tasks(Who::PlatformAdmin)
                .submit_task(SubmitTaskRequest {
                    parent: pipeline(tenant),
                    ..SubmitTaskRequest::default()
                })
                .await
                .unwrap()
                .into_inner();
            f.tasks.insert(tenant, task.name);
        }
        for (who, role) in [
            (Who::TenantAdmin, Role::TenantAdmin),
            (Who::Submitter, Role::Submitter),
            (Who::Viewer, Role::Viewer),
            (Who::Agent, Role::Agent),
        ] {
            let pipelines = if who == Who::Agent {
                vec![pipeline(OWN)]
            } else {
                vec![]
            };
            let created = f
                .tenants(Who::PlatformAdmin)
                .create_client(CreateClientRequest {
                    parent: format!("tenants/{OWN}"),
                    client: Some(Client {
                        roles: vec![role as i32],
                        pipelines,
                        priority: Some(3),
                        ..Client::default()
                    }),
                })
                .await
                .unwrap()
                .into_inner();
            let client = created.client.unwrap();
            let token = f
                .issue(&client.client_id, &created.client_secret)
                .await
                .unwrap();
            f.clients.insert(
                who,
                (client.client_id.clone(), created.client_secret, client),
            );
            f.tokens.insert(who, token);
        }
        f.tokens.insert(Who::Garbage, "not-a-token".into());
        // The submitter's token with its payload changed to claim the platform admin role.
        let real = f.tokens[&Who::Submitter].clone();
        let parts: Vec<&str> = real.split('.').collect();
        let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        let forged = payload.replace("\"submitter\"", "\"platform-admin\"");
        assert_ne!(payload, forged);
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(forged),
            parts[2]
        );
        f.tokens.insert(Who::Tampered, tampered);
        f
    }

    fn next(&mut self) -> u32 {
        self.serial += 1;
        self.serial
    }

    /// Makes `rpc` as `who` on a resource of `tenant`; the code it answers (OK included).
    async fn call(&mut self, rpc: Rpc, who: Who, tenant: &str) -> Code {
        let n = self.next();
        let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
        let tn = format!("tenants/{tenant}");
        let app = format!("{tn}/applications/app");
        match rpc {
            Rpc::CreateTenant => code(
                self.tenants(who)
                    .create_tenant(CreateTenantRequest {
                        tenant_id: format!("{tenant}-new-{n}"),
                        tenant: None,
                    })
                    .await
                    .map(drop),
            ),
            Rpc::GetTenant => code(
                self.tenants(who)
                    .get_tenant(GetTenantRequest { name: tn })
                    .await
                    .map(drop),
            ),
            Rpc::ListTenants => code(
                self.tenants(who)
                    .list_tenants(ListTenantsRequest::default())
                    .await
                    .map(drop),
            ),
            // Refused for its applications when allowed: nothing is lost.
            Rpc::DeleteTenant => code(
                self.tenants(who)
                    .delete_tenant(DeleteTenantRequest { name: tn })
                    .await
                    .map(drop),
            ),
            Rpc::CreateClient => code(
                self.tenants(who)
                    .create_client(CreateClientRequest {
                        parent: tn,
                        client: Some(Client {
                            roles: vec![Role::Viewer as i32],
                            ..Client::default()
                        }),
                    })
                    .await
                    .map(drop),
            ),
            Rpc::ListClients => code(
                self.tenants(who)
                    .list_clients(ListClientsRequest {
                        parent: tn,
                        ..ListClientsRequest::default()
                    })
                    .await
                    .map(drop),
            ),
            Rpc::DeleteClient => code(
                self.tenants(who)
                    .delete_client(DeleteClientRequest {
                        name: format!("{tn}/clients/nobody{n}"),
                    })
                    .await
                    .map(drop),
            ),
            Rpc::CreateApplication => code(
                self.pipelines(who)
                    .create_application(CreateApplicationRequest {
                        parent: tn,
                        application_id: format!("app{n}"),
                        application: None,
                    })
                    .await
                    .map(drop),
            ),
            Rpc::GetApplication => code(
                self.pipelines(who)
                    .get_application(GetApplicationRequest { name: app })
                    .await
                    .map(drop),
            ),
            Rpc::ListApplications => code(
                self.pipelines(who)
                    .list_applications(ListApplicationsRequest {
                        parent: tn,
                        ..ListApplicationsRequest::default()
                    })
                    .await
                    .map(drop),
            ),
            Rpc::DeleteApplication => code(
                self.pipelines(who)
                    .delete_application(DeleteApplicationRequest {
                        name: format!("{tn}/applications/none{n}"),
                    })
                    .await
                    .map(drop),
            ),
            Rpc::ApplyPipeline => code(
                self.pipelines(who)
                    .apply_pipeline(ApplyPipelineRequest {
                        parent: app,
                        pipeline_id: format!("p{n}"),
                        source: Some(apply_pipeline_request::Source::SpecDocument(
                            "stages: [{name: s, jobs: [{name: j, commands: [\"true\"]}]}]".into(),
                        )),
                    })
                    .await
                    .map(drop),
            ),
            Rpc::GetPipeline => code(
                self.pipelines(who)
                    .get_pipeline(GetPipelineRequest {
                        name: pipeline(tenant),
                        version: 0,
                    })
                    .await
                    .map(drop),
            ),
            Rpc::GetPipelineStats => code(
                self.pipelines(who)
                    .get_pipeline_stats(GetPipelineStatsRequest {
                        name: pipeline(tenant),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            Rpc::ListPipelines => code(
                self.pipelines(who)
                    .list_pipelines(ListPipelinesRequest {
                        parent: app,
                        ..ListPipelinesRequest::default()
                    })
                    .await
                    .map(drop),
            ),
            Rpc::DeletePipeline => code(
                self.pipelines(who)
                    .delete_pipeline(DeletePipelineRequest {
                        name: format!("{app}/pipelines/none{n}"),
                    })
                    .await
                    .map(drop),
            ),
            Rpc::SubmitTask => code(
                self.tasks(who)
                    .submit_task(SubmitTaskRequest {
                        parent: pipeline(tenant),
                        ..SubmitTaskRequest::default()
                    })
                    .await
                    .map(drop),
            ),
            Rpc::SubmitTasks => {
                let answer = self
                    .tasks(who)
                    .submit_tasks(SubmitTasksRequest {
                        requests: vec![SubmitTaskRequest {
                            parent: pipeline(tenant),
                            ..SubmitTaskRequest::default()
                        }],
                    })
                    .await;
                // A batch answers per task: a refused task carries its own code.
                match answer {
                    Err(s) => s.code(),
                    Ok(r) => match r.into_inner().results[0].outcome.clone() {
                        Some(submit_task_result::Outcome::Error(e)) => Code::from(e.code),
                        _ => Code::Ok,
                    },
                }
            }
            Rpc::GetTask => code(
                self.tasks(who)
                    .get_task(GetTaskRequest {
                        name: self.tasks[tenant].clone(),
                    })
                    .await
                    .map(drop),
            ),
            Rpc::WatchTask => {
                let opened = self
                    .tasks(who)
                    .watch_task(WatchTaskRequest {
                        name: self.tasks[tenant].clone(),
                    })
                    .await;
                match opened {
                    Err(s) => s.code(),
                    Ok(mut stream) => code(stream.get_mut().message().await.map(drop)),
                }
            }
            Rpc::CancelTask => code(
                self.tasks(who)
                    .cancel_task(CancelTaskRequest {
                        name: self.tasks[tenant].clone(),
                    })
                    .await
                    .map(drop),
            ),
            Rpc::ListTasks => code(
                self.tasks(who)
                    .list_tasks(ListTasksRequest {
                        parent: pipeline(tenant),
                        ..ListTasksRequest::default()
                    })
                    .await
                    .map(drop),
            ),
            Rpc::IssueToken => code(
                pm_proto::client::auth(self.channel.clone())
                    .issue_token(IssueTokenRequest {
                        client_id: "nobody".into(),
                        client_secret: "wrong".into(),
                    })
                    .await
                    .map(drop),
            ),
            Rpc::Connect => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                tx.send(AgentMessage {
                    message: Some(agent_message::Message::Hello(Hello {
                        agent_id: format!("probe-{n}"),
                        pipelines: vec![pipeline(tenant)],
                        // No slot: it is only let in, never given work.
                        slots: 0,
                        protocol_min: pm_proto::AGENT_PROTOCOL_VERSION,
                        protocol_max: pm_proto::AGENT_PROTOCOL_VERSION,
                        held_leases: vec![Lease {
                            task: self.tasks[tenant].clone(),
                            lease_id: format!("{n:032x}"),
                            attempt: 1,
                            deadline_ms: 0,
                        }],
                        ..Hello::default()
                    })),
                })
                .unwrap();
                let answer = pm_proto::client::agents_with(self.channel.clone(), self.bearer(who))
                    .connect(UnboundedReceiverStream::new(rx))
                    .await;
                drop(tx);
                match answer {
                    Err(s) => s.code(),
                    Ok(mut stream) => code(stream.get_mut().message().await.map(drop)),
                }
            }
        }
    }
}

/// What `who` should get for `rpc` on a resource of `tenant`: UNAUTHENTICATED without a
/// valid token, PERMISSION_DENIED for a missing role or another tenant, else not refused.
fn expected(rpc: Rpc, who: Who, tenant: &str) -> Result<(), Code> {
    let permitted = allowed(rpc).contains(&who);
    if rpc == Rpc::IssueToken {
        // The credentials are wrong whoever asks: refused as such, never for the caller.
        return Err(Code::Unauthenticated);
    }
    match who {
        Who::NoToken | Who::Garbage | Who::Tampered => Err(Code::Unauthenticated),
        _ if !permitted => Err(Code::PermissionDenied),
        // ListTenants names no tenant: it is narrowed instead (checked below).
        Who::PlatformAdmin => Ok(()),
        _ if rpc == Rpc::ListTenants => Ok(()),
        _ if tenant != OWN => Err(Code::PermissionDenied),
        _ => Ok(()),
    }
}

#[tokio::test]
async fn every_rpc_by_every_role_in_its_own_and_another_tenant() {
    let mut f = Fixture::start().await;
    let mut wrong = Vec::new();
    let mut checked = 0;
    for rpc in Rpc::ALL {
        for who in EVERYONE {
            for tenant in [OWN, OTHER] {
                let got = f.call(rpc, who, tenant).await;
                let ok = match expected(rpc, who, tenant) {
                    Err(code) => got == code,
                    Ok(()) => !matches!(got, Code::Unauthenticated | Code::PermissionDenied),
                };
                if !ok {
                    wrong.push(format!(
                        "{rpc:?} by {who:?} in {tenant}: got {got:?}, expected {:?}",
                        expected(rpc, who, tenant)
                    ));
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, Rpc::ALL.len() * 8 * 2);
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    f.dev.stop().await;
}

/// Plain HTTP with JSON goes through the same authentication and authorization: a token in
/// `Authorization: Bearer`, the same answers as gRPC (as HTTP statuses).
/// A client may hold only so many watches (`--max-watches-per-client`): the next is
/// RESOURCE_EXHAUSTED naming the setting, another client is not held back, and a closed watch
/// gives its place back.
#[tokio::test]
async fn watches_are_bounded_per_client() {
    let f = Fixture::start_with(2).await;
    let parent = format!("tenants/{OWN}/applications/app");
    f.pipelines(Who::PlatformAdmin)
        .apply_pipeline(ApplyPipelineRequest {
            parent: parent.clone(),
            pipeline_id: "slow".into(),
            source: Some(apply_pipeline_request::Source::SpecDocument(
                "stages: [{name: s, jobs: [{name: j, commands: [\"sleep 600\"]}]}]".into(),
            )),
        })
        .await
        .unwrap();
    let task = f
        .tasks(Who::Submitter)
        .submit_task(SubmitTaskRequest {
            parent: format!("{parent}/pipelines/slow"),
            ..SubmitTaskRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let watch = |who: Who| {
        let mut tasks = f.tasks(who);
        let name = task.name.clone();
        async move {
            let mut stream = tasks
                .watch_task(WatchTaskRequest { name })
                .await?
                .into_inner();
            // Open on every side: the snapshot came through.
            stream.message().await?.expect("a snapshot");
            Ok::<_, tonic::Status>(stream)
        }
    };
    let first = watch(Who::Viewer).await.unwrap();
    let _second = watch(Who::Viewer).await.unwrap();
    let refused = watch(Who::Viewer).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-watches-per-client"),
        "{refused:?}"
    );
    let _other = watch(Who::Submitter).await.unwrap();
    // The gateway sees the close when the stream is reset: bounded retries until it has.
    drop(first);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match watch(Who::Viewer).await {
            Ok(_third) => break,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(std::time::Instant::now() < deadline, "never given back");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
}

#[tokio::test]
async fn curl_with_json_is_authorized_as_grpc_is() {
    let f = Fixture::start().await;
    let url = format!("{}/pm.v1.TaskService/GetTask", f.dev.endpoint());
    let cases = [
        (Who::NoToken, OWN, 401, "unauthenticated"),
        (Who::Garbage, OWN, 401, "unauthenticated"),
        (Who::Viewer, OTHER, 403, "permission_denied"),
        (Who::Viewer, OWN, 200, ""),
    ];
    for (who, tenant, status, code) in cases {
        let body = format!(r#"{{"name":"{}"}}"#, f.tasks[tenant]);
        // No token: no header at all.
        let header = f
            .tokens
            .get(&who)
            .map(|t| format!("Authorization: Bearer {t}"));
        let url = url.clone();
        let (got, answer) = tokio::task::spawn_blocking(move || {
            let headers: Vec<&str> = header.iter().map(String::as_str).collect();
            super::curl_json(&url, &body, &headers)
        })
        .await
        .unwrap();
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(got, status, "{who:?} in {tenant}: {answer}");
        match code {
            "" => assert_eq!(answer["name"], f.tasks[tenant].as_str()),
            code => assert_eq!(answer["code"], code, "{who:?}"),
        }
    }
    f.dev.stop().await;
}

#[tokio::test]
async fn lists_narrow_to_the_callers_tenant_and_identity_comes_from_the_token() {
    let f = Fixture::start().await;
    let listed = f
        .tenants(Who::Viewer)
        .list_tenants(ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.tenants.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, [format!("tenants/{OWN}")]);
    let all = f
        .tenants(Who::PlatformAdmin)
        .list_tenants(ListTenantsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all.tenants.len() >= 3, "{:?}", all.tenants);

    // The task records who submitted it: the token's client, whatever the request says.
    let task = f
        .tasks(Who::Submitter)
        .submit_task(SubmitTaskRequest {
            parent: pipeline(OWN),
            ..SubmitTaskRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(task.client, f.clients[&Who::Submitter].2.name);

    // A tenant admin cannot mint a platform admin.
    let escalate = f
        .tenants(Who::TenantAdmin)
        .create_client(CreateClientRequest {
            parent: format!("tenants/{OWN}"),
            client: Some(Client {
                roles: vec![Role::PlatformAdmin as i32],
                ..Client::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(escalate.code(), Code::PermissionDenied, "{escalate:?}");
    // Nor delete the platform admin, who lives in a tenant of its own.
    let Some(Credentials::Client { id, .. }) = f.dev.admin.clone() else {
        unreachable!()
    };
    let remove_admin = f
        .tenants(Who::TenantAdmin)
        .delete_client(DeleteClientRequest {
            name: format!("tenants/platform/clients/{id}"),
        })
        .await
        .unwrap_err();
    assert_eq!(remove_admin.code(), Code::PermissionDenied);

    // An agent's scope: empty Hello means its own pipelines; it gets their tasks only.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(AgentMessage {
        message: Some(agent_message::Message::Hello(Hello {
            agent_id: "scoped".into(),
            slots: 1,
            protocol_min: pm_proto::AGENT_PROTOCOL_VERSION,
            protocol_max: pm_proto::AGENT_PROTOCOL_VERSION,
            ..Hello::default()
        })),
    })
    .unwrap();
    let mut stream = pm_proto::client::agents_with(f.channel.clone(), f.bearer(Who::Agent))
        .connect(UnboundedReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let welcome = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        welcome.message,
        Some(server_message::Message::Welcome(_))
    ));
    drop(tx);
    f.dev.stop().await;
}

#[tokio::test]
async fn credentials_are_checked_and_a_deleted_client_gets_no_new_token() {
    let f = Fixture::start().await;
    let (id, secret, client) = f.clients[&Who::Submitter].clone();
    let wrong = f.issue(&id, &format!("{secret}x")).await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let empty = f.issue(&id, "").await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(
        pm_proto::status::violated_field(&empty).as_deref(),
        Some("client_secret")
    );
    assert!(f.issue(&id, &secret).await.is_ok());
    // An agent's token source asks once and reuses the token while it is fresh.
    let source = pm_proto::client::TokenSource::new(Credentials::Client {
        id: id.clone(),
        secret: secret.clone(),
    });
    let first = source.token(&f.channel).await.unwrap().unwrap();
    f.tenants(Who::TenantAdmin)
        .delete_client(DeleteClientRequest {
            name: client.name.clone(),
        })
        .await
        .unwrap();
    let gone = f.issue(&id, &secret).await.unwrap_err();
    assert_eq!(gone.code(), Code::Unauthenticated);
    // Tokens already issued stay valid until they expire (no revocation list).
    assert_eq!(source.token(&f.channel).await.unwrap().unwrap(), first);
    // The listing never shows a secret or its hash: only the public record.
    let listed = f
        .tenants(Who::TenantAdmin)
        .list_clients(ListClientsRequest {
            parent: format!("tenants/{OWN}"),
            ..ListClientsRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let text = format!("{listed:?}");
    assert!(!text.contains(&f.clients[&Who::Viewer].1));
    assert!(!text.contains("argon2"));
    f.dev.stop().await;
}

/// `pmctl` with `pm dev --auth`: runs the real binary with the environment given.
fn pmctl(endpoint: &str, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pmctl"))
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .env_remove("PM_TOKEN")
        .env_remove("PM_TOKEN_FILE")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[tokio::test]
async fn pmctl_logs_in_and_manages_clients_with_tokens() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::start().await;
    let endpoint = f.dev.endpoint();
    let admin_file = f
        .dir
        .path()
        .join("data")
        .join(pm_cli::dev::ADMIN_TOKEN_FILE);
    // pmctl blocks: off the runtime that serves pm dev.
    tokio::task::spawn_blocking(move || {
        let home = tempfile::tempdir().unwrap();
        let config = home.path().display().to_string();
        let admin_file = admin_file.display().to_string();
        let admin = [
            ("PM_TOKEN_FILE", admin_file.as_str()),
            ("XDG_CONFIG_HOME", config.as_str()),
        ];
        let nobody = [("XDG_CONFIG_HOME", config.as_str())];

        let refused = pmctl(&endpoint, &nobody, &["app", "list", OWN]);
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("Unauthenticated"), "{stderr}");

        let created = pmctl(
            &endpoint,
            &admin,
            &["client", "create", OWN, "--role", "submitter", "-o", "json"],
        );
        assert!(created.status.success(), "{created:?}");
        let json: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
        let id = json["client"]["clientId"].as_str().unwrap().to_owned();
        let secret = json["clientSecret"].as_str().unwrap().to_owned();

        let mut login_env = nobody.to_vec();
        login_env.push(("PM_CLIENT_SECRET", secret.as_str()));
        let login = pmctl(&endpoint, &login_env, &["login", "--client-id", &id]);
        assert!(login.status.success(), "{login:?}");
        let cache = home.path().join("pmctl").join("token");
        let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // The cached token is used for this endpoint: a submitter may submit, not make apps.
        let pipeline = format!("{OWN}/app/p");
        let submitted = pmctl(&endpoint, &nobody, &["submit", &pipeline]);
        assert!(submitted.status.success(), "{submitted:?}");
        let denied = pmctl(&endpoint, &nobody, &["app", "create", &format!("{OWN}/x")]);
        let stderr = String::from_utf8_lossy(&denied.stderr);
        assert!(
            !denied.status.success() && stderr.contains("PermissionDenied"),
            "{stderr}"
        );

        let listed = pmctl(&endpoint, &admin, &["client", "list", OWN]);
        assert!(String::from_utf8_lossy(&listed.stdout).contains(&id));
        let deleted = pmctl(
            &endpoint,
            &admin,
            &["client", "delete", &format!("{OWN}/{id}")],
        );
        assert!(deleted.status.success(), "{deleted:?}");
        let again = pmctl(&endpoint, &login_env, &["login", "--client-id", &id]);
        assert!(!again.status.success(), "a deleted client logged in");
    })
    .await
    .unwrap();
    f.dev.stop().await;
}

/// CreateClient's own fields: each bad one is INVALID_ARGUMENT naming it, and nothing is made.
#[tokio::test]
async fn a_bad_client_is_refused_naming_its_field() {
    let f = Fixture::start().await;
    let other_pipeline = pipeline(OTHER);
    let cases: Vec<(Client, &str)> = vec![
        (Client::default(), "client.roles"),
        (
            Client {
                roles: vec![99],
                ..Client::default()
            },
            "client.roles[0]",
        ),
        (
            Client {
                roles: vec![Role::Viewer as i32],
                pipelines: vec![pipeline(OWN)],
                ..Client::default()
            },
            "client.pipelines",
        ),
        (
            Client {
                roles: vec![Role::Agent as i32],
                ..Client::default()
            },
            "client.pipelines",
        ),
        (
            Client {
                roles: vec![Role::Agent as i32],
                pipelines: vec![other_pipeline],
                ..Client::default()
            },
            "client.pipelines[0]",
        ),
        (
            Client {
                roles: vec![Role::Viewer as i32],
                priority: Some(101),
                ..Client::default()
            },
            "client.priority",
        ),
    ];
    // The tenant's clients, counted as its admin sees them.
    let clients = || async {
        f.tenants(Who::TenantAdmin)
            .list_clients(ListClientsRequest {
                parent: format!("tenants/{OWN}"),
                ..ListClientsRequest::default()
            })
            .await
            .unwrap()
            .into_inner()
            .clients
            .len()
    };
    let before = clients().await;
    for (client, field) in cases {
        let refused = f
            .tenants(Who::TenantAdmin)
            .create_client(CreateClientRequest {
                parent: format!("tenants/{OWN}"),
                client: Some(client.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{client:?}: {refused:?}"
        );
        assert_eq!(
            pm_proto::status::violated_field(&refused).as_deref(),
            Some(field),
            "{client:?}"
        );
    }
    let after = clients().await;
    assert_eq!(before, after, "no refused client was made");
    f.dev.stop().await;
}
