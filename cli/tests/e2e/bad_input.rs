//! Every public RPC, called with bad input through the gateway of `pm dev` (and
//! `RunnerService.Run` at the agent that serves it): each answer has
//! the exact code, names the field, and never echoes an over-long value back whole (a
//! message that large would not fit in the `grpc-message` header and the client would see
//! INTERNAL instead). The expected outcomes are this file's own table; the list of RPCs and
//! of their request fields is the compiled protos', so an RPC or a request field added
//! without a row here fails the test (`NO_ROW` lists the fields no value of which is refused).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Status};

use pm_proto::v1::*;

use super::{APP, Harness, pipeline_name, start};

/// A value far over every limit: longer than any name, id, token or display name may be.
fn long() -> String {
    "a".repeat(10 * 1024)
}

/// Most bytes of an answer's message; a refusal says what was wrong, not the whole value.
const MESSAGE_BYTES: usize = 1024;

/// The methods this file called with bad input (the first word of each row's label).
static COVERED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// The request fields a row's refusal named, as (method, the field path's first segment).
static FIELDS: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());

/// Request fields with no row, and why: no value of theirs is refused. Every other field of
/// every public request (its top level: a row naming `client.roles` covers `client`) must be
/// named by a refusal above, so a new field without a row fails the test.
const NO_ROW: &[(&str, &str, &str)] = &[(
    "GetPipeline",
    "version",
    "every number may name a version; one never applied is NOT_FOUND (a row)",
)];

/// Every method of every public service (`pm.v1`) with its request message, from the
/// compiled protos: a new RPC or field is here without anyone adding it.
fn public_requests() -> BTreeMap<String, prost_types::DescriptorProto> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(pm_proto::FILE_DESCRIPTOR_SET).unwrap();
    let messages: HashMap<String, &prost_types::DescriptorProto> = set
        .file
        .iter()
        .flat_map(|f| {
            f.message_type
                .iter()
                .map(move |m| (format!(".{}.{}", f.package(), m.name()), m))
        })
        .collect();
    set.file
        .iter()
        .filter(|f| f.package() == "pm.v1")
        .flat_map(|f| &f.service)
        .flat_map(|s| &s.method)
        .map(|m| (m.name().to_owned(), messages[m.input_type()].clone()))
        .collect()
}

/// `name` as a coverage key of `message`: a oneof member stands for its oneof.
fn field_key(message: &prost_types::DescriptorProto, name: &str) -> String {
    message
        .field
        .iter()
        .find(|f| f.name() == name)
        // An `optional` field sits in a oneof of its own, which is no choice.
        .filter(|f| !f.proto3_optional())
        .and_then(|f| f.oneof_index)
        .map(|i| message.oneof_decl[i as usize].name().to_owned())
        .unwrap_or_else(|| name.to_owned())
}

/// Checks one refusal against the table: its code, the field it names (`""` for none) and
/// the size of its message.
fn refused<T: std::fmt::Debug>(what: &str, got: Result<T, Status>, code: Code, field: &str) {
    let method = what.split_whitespace().next().unwrap_or_default();
    COVERED.lock().unwrap().insert(method.to_owned());
    let first = field.split(['.', '[']).next().unwrap_or_default();
    if !first.is_empty() {
        FIELDS
            .lock()
            .unwrap()
            .insert((method.to_owned(), first.to_owned()));
    }
    let status = match got {
        Ok(answer) => panic!("{what}: accepted: {answer:?}"),
        Err(status) => status,
    };
    let named = pm_proto::status::violated_field(&status).unwrap_or_default();
    assert_eq!(
        (status.code(), named.as_str()),
        (code, field),
        "{what}: {status:?}"
    );
    assert!(
        status.message().len() <= MESSAGE_BYTES,
        "{what}: a {}-byte message",
        status.message().len()
    );
    if code == Code::InvalidArgument && !field.is_empty() {
        assert!(
            status.message().starts_with(field),
            "{what}: the message starts with the field: {status:?}"
        );
    }
}

/// Input documents a task may not carry: too large, and a number JSON cannot write.
fn bad_inputs() -> [(&'static str, prost_types::Value); 2] {
    let big = "x".repeat(pm_spec::limits::MAX_INPUT_BYTES);
    let nan = prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
    };
    [
        (
            "oversized input",
            pm_proto::json::from_json(serde_json::json!({ "big": big })),
        ),
        ("input with NaN", nan),
    ]
}

#[tokio::test]
async fn every_rpc_refuses_bad_input_with_the_code_naming_the_field() {
    let mut h: Harness = start().await;
    let channel = pm_proto::client::channel(&h.dev.endpoint()).unwrap();
    let mut tenants = pm_proto::client::tenants(channel.clone());
    let mut auth = pm_proto::client::auth(channel.clone());
    let mut agents = pm_proto::client::agents(channel.clone());
    let mut raw_agents = pm_proto::client::raw_agents(channel);
    let (long, ocr) = (long(), pipeline_name("ocr"));
    use Code::{AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unauthenticated};

    // TenantService.
    for (id, code, field) in [
        ("", InvalidArgument, "tenant_id"),
        ("Upper", InvalidArgument, "tenant_id"),
        (long.as_str(), InvalidArgument, "tenant_id"),
        ("default", AlreadyExists, ""),
    ] {
        let got = tenants
            .create_tenant(CreateTenantRequest {
                tenant_id: id.into(),
                tenant: None,
            })
            .await;
        refused(&format!("CreateTenant {:.20}", id), got, code, field);
    }
    let got = tenants
        .create_tenant(CreateTenantRequest {
            tenant_id: "named".into(),
            tenant: Some(Tenant {
                display_name: long.clone(),
                ..Tenant::default()
            }),
        })
        .await;
    refused(
        "CreateTenant long display_name",
        got,
        InvalidArgument,
        "tenant.display_name",
    );
    for (name, code, field) in [
        ("default", InvalidArgument, "name"),
        (&*format!("tenants/{long}"), InvalidArgument, "name"),
        ("tenants/nope", NotFound, ""),
    ] {
        let get = GetTenantRequest { name: name.into() };
        refused("GetTenant", tenants.get_tenant(get).await, code, field);
        let delete = DeleteTenantRequest { name: name.into() };
        refused(
            "DeleteTenant",
            tenants.delete_tenant(delete).await,
            code,
            field,
        );
    }
    let got = tenants
        .delete_tenant(DeleteTenantRequest {
            name: "tenants/default".into(),
        })
        .await;
    refused(
        "DeleteTenant with applications",
        got,
        FailedPrecondition,
        "",
    );
    for (size, token, field) in [(1_000_000, "", "page_size"), (0, "a/b", "page_token")] {
        let got = tenants
            .list_tenants(ListTenantsRequest {
                page_size: size,
                page_token: token.into(),
            })
            .await;
        refused("ListTenants", got, InvalidArgument, field);
    }
    let client = |roles: Vec<i32>, display_name: &str| Client {
        roles,
        display_name: display_name.into(),
        ..Client::default()
    };
    let submitter = Role::Submitter as i32;
    for (parent, given, code, field) in [
        (
            "default",
            client(vec![submitter], ""),
            InvalidArgument,
            "parent",
        ),
        ("tenants/nope", client(vec![submitter], ""), NotFound, ""),
        (
            "tenants/default",
            client(vec![], ""),
            InvalidArgument,
            "client.roles",
        ),
        (
            "tenants/default",
            client(vec![99], ""),
            InvalidArgument,
            "client.roles[0]",
        ),
        (
            "tenants/default",
            client(vec![submitter], &long),
            InvalidArgument,
            "client.display_name",
        ),
    ] {
        let got = tenants
            .create_client(CreateClientRequest {
                parent: parent.into(),
                client: Some(given),
            })
            .await;
        refused("CreateClient", got, code, field);
    }
    for (parent, size, token, field) in [
        (format!("tenants/{long}"), 0, "", "parent"),
        ("tenants/default".to_owned(), 1_000_000, "", "page_size"),
        ("tenants/default".to_owned(), 0, "a/b", "page_token"),
    ] {
        let got = tenants
            .list_clients(ListClientsRequest {
                parent,
                page_size: size,
                page_token: token.into(),
            })
            .await;
        refused("ListClients", got, InvalidArgument, field);
    }
    for (name, code, field) in [
        ("tenants/default", InvalidArgument, "name"),
        (
            &*format!("tenants/default/clients/{long}"),
            InvalidArgument,
            "name",
        ),
        ("tenants/default/clients/nope", NotFound, ""),
    ] {
        let got = tenants
            .delete_client(DeleteClientRequest { name: name.into() })
            .await;
        refused("DeleteClient", got, code, field);
    }

    // PipelineService: applications.
    for (parent, id, code, field) in [
        ("default", "x", InvalidArgument, "parent"),
        ("tenants/default", "", InvalidArgument, "application_id"),
        (
            "tenants/default",
            long.as_str(),
            InvalidArgument,
            "application_id",
        ),
        ("tenants/nope", "x", NotFound, ""),
        ("tenants/default", "demo", AlreadyExists, ""),
    ] {
        let got = h
            .pipelines
            .create_application(CreateApplicationRequest {
                parent: parent.into(),
                application_id: id.into(),
                application: None,
            })
            .await;
        refused("CreateApplication", got, code, field);
    }
    let got = h
        .pipelines
        .create_application(CreateApplicationRequest {
            parent: "tenants/default".into(),
            application_id: "named".into(),
            application: Some(Application {
                display_name: long.clone(),
                ..Application::default()
            }),
        })
        .await;
    refused(
        "CreateApplication long display_name",
        got,
        InvalidArgument,
        "application.display_name",
    );
    for (name, code, field) in [
        ("tenants/default", InvalidArgument, "name"),
        (&*format!("{APP}{long}"), InvalidArgument, "name"),
        ("tenants/default/applications/nope", NotFound, ""),
    ] {
        let get = GetApplicationRequest { name: name.into() };
        refused(
            "GetApplication",
            h.pipelines.get_application(get).await,
            code,
            field,
        );
        let delete = DeleteApplicationRequest { name: name.into() };
        let got = h.pipelines.delete_application(delete).await;
        refused("DeleteApplication", got, code, field);
    }
    let got = h
        .pipelines
        .delete_application(DeleteApplicationRequest { name: APP.into() })
        .await;
    refused(
        "DeleteApplication with pipelines",
        got,
        FailedPrecondition,
        "",
    );
    for (parent, size, token, field) in [
        (long.as_str(), 0, "", "parent"),
        ("tenants/default", 1_000_000, "", "page_size"),
        ("tenants/default", 0, long.as_str(), "page_token"),
    ] {
        let got = h
            .pipelines
            .list_applications(ListApplicationsRequest {
                parent: parent.into(),
                page_size: size,
                page_token: token.into(),
            })
            .await;
        refused("ListApplications", got, InvalidArgument, field);
    }

    // PipelineService: pipelines.
    let document = "stages: [{name: s, jobs: [{name: j, commands: [date]}]}]";
    for (parent, id, field) in [
        (long.as_str(), "p", "parent"),
        (APP, long.as_str(), "pipeline_id"),
        (APP, "Bad", "pipeline_id"),
    ] {
        let got = h
            .pipelines
            .apply_pipeline(ApplyPipelineRequest {
                parent: parent.into(),
                pipeline_id: id.into(),
                source: Some(apply_pipeline_request::Source::SpecDocument(
                    document.into(),
                )),
            })
            .await;
        refused("ApplyPipeline", got, InvalidArgument, field);
    }
    for (source, field) in [
        (None, "source"),
        (
            Some(apply_pipeline_request::Source::SpecDocument(
                "stages: []".into(),
            )),
            "spec_document.stages",
        ),
        (
            Some(apply_pipeline_request::Source::Spec(PipelineSpec::default())),
            "spec.stages",
        ),
    ] {
        let got = h
            .pipelines
            .apply_pipeline(ApplyPipelineRequest {
                parent: APP.into(),
                pipeline_id: "p".into(),
                source,
            })
            .await;
        refused("ApplyPipeline source", got, InvalidArgument, field);
    }
    for (name, version, code, field) in [
        (APP.to_owned(), 0, InvalidArgument, "name"),
        (
            format!("{APP}/pipelines/{long}"),
            0,
            InvalidArgument,
            "name",
        ),
        (pipeline_name("nope"), 0, NotFound, ""),
        (ocr.clone(), 999, NotFound, ""),
    ] {
        let get = GetPipelineRequest {
            name: name.clone(),
            version,
        };
        refused(
            "GetPipeline",
            h.pipelines.get_pipeline(get).await,
            code,
            field,
        );
        if version == 0 {
            let stats = GetPipelineStatsRequest {
                name: name.clone(),
                ..Default::default()
            };
            let got = h.pipelines.get_pipeline_stats(stats).await;
            refused("GetPipelineStats", got, code, field);
            let delete = DeletePipelineRequest { name };
            let got = h.pipelines.delete_pipeline(delete).await;
            refused("DeletePipeline", got, code, field);
        }
    }
    for (parent, size, token, field) in [
        ("tenants/default", 0, "", "parent"),
        (APP, 1_000_000, "", "page_size"),
        (APP, 0, "x/y", "page_token"),
    ] {
        let got = h
            .pipelines
            .list_pipelines(ListPipelinesRequest {
                parent: parent.into(),
                page_size: size,
                page_token: token.into(),
            })
            .await;
        refused("ListPipelines", got, InvalidArgument, field);
    }

    // TaskService (SubmitTask's own matrix is in `bad_input_gets_the_exact_code_naming_the_field`).
    let got = h
        .tasks
        .submit_task(SubmitTaskRequest {
            parent: format!("{APP}/pipelines/{long}"),
            ..SubmitTaskRequest::default()
        })
        .await;
    refused("SubmitTask long parent", got, InvalidArgument, "parent");
    let got = h
        .tasks
        .submit_task(SubmitTaskRequest {
            parent: ocr.clone(),
            params: HashMap::from([("url".into(), "x".into())]),
            idempotency_key: long.clone(),
            ..SubmitTaskRequest::default()
        })
        .await;
    refused(
        "SubmitTask long key",
        got,
        InvalidArgument,
        "idempotency_key",
    );
    let url = || HashMap::from([("url".to_owned(), "x".to_owned())]);
    for (what, request, field) in [
        (
            "undeclared param",
            SubmitTaskRequest {
                params: HashMap::from([("url".into(), "x".into()), ("bogus".into(), "1".into())]),
                ..SubmitTaskRequest::default()
            },
            "params.bogus",
        ),
        (
            "priority 101",
            SubmitTaskRequest {
                params: url(),
                priority: Some(101),
                ..SubmitTaskRequest::default()
            },
            "priority",
        ),
        (
            "timeout over a week",
            SubmitTaskRequest {
                params: url(),
                timeout_seconds: pm_spec::limits::MAX_TIMEOUT_SECONDS + 1,
                ..SubmitTaskRequest::default()
            },
            "timeout_seconds",
        ),
    ] {
        let request = SubmitTaskRequest {
            parent: ocr.clone(),
            ..request
        };
        let got = h.tasks.submit_task(request).await;
        refused(&format!("SubmitTask {what}"), got, InvalidArgument, field);
    }
    // An inline spec is checked like an applied one, on a pipeline that allows them.
    h.apply("name: open\nallow_inline_tasks: true\nstages:\n  - name: s\n    jobs:\n      - { name: j, commands: [date] }\n").await;
    for (inline, field) in [
        (
            submit_task_request::Inline::InlineSpecDocument("stages: []".into()),
            "inline_spec_document.stages",
        ),
        (
            submit_task_request::Inline::InlineSpec(PipelineSpec::default()),
            "inline_spec.stages",
        ),
    ] {
        let got = h
            .tasks
            .submit_task(SubmitTaskRequest {
                parent: pipeline_name("open"),
                inline: Some(inline),
                ..SubmitTaskRequest::default()
            })
            .await;
        refused("SubmitTask bad inline spec", got, InvalidArgument, field);
    }
    for (what, input) in bad_inputs() {
        let got = h
            .tasks
            .submit_task(SubmitTaskRequest {
                parent: ocr.clone(),
                params: HashMap::from([("url".into(), "x".into())]),
                input: Some(input),
                ..SubmitTaskRequest::default()
            })
            .await;
        refused(&format!("SubmitTask {what}"), got, InvalidArgument, "input");
    }
    let requests = vec![SubmitTaskRequest::default(); 10_000];
    let got = h.tasks.submit_tasks(SubmitTasksRequest { requests }).await;
    refused("SubmitTasks too many", got, InvalidArgument, "requests");
    let missing = format!("{ocr}/tasks/{:032x}", 1);
    for (name, code, field) in [
        (ocr.clone(), InvalidArgument, "name"),
        (format!("{ocr}/tasks/{long}"), InvalidArgument, "name"),
        (missing, NotFound, ""),
    ] {
        let get = GetTaskRequest { name: name.clone() };
        refused("GetTask", h.tasks.get_task(get).await, code, field);
        let cancel = CancelTaskRequest { name: name.clone() };
        refused("CancelTask", h.tasks.cancel_task(cancel).await, code, field);
        let watch = WatchTaskRequest { name };
        refused("WatchTask", h.tasks.watch_task(watch).await, code, field);
    }
    for (parent, size, token, field) in [
        (APP.to_owned(), 0, String::new(), "parent"),
        (
            format!("{APP}/pipelines/{long}"),
            0,
            String::new(),
            "parent",
        ),
        (ocr.clone(), 1_000_000, String::new(), "page_size"),
        (ocr.clone(), 0, "not-an-id".to_owned(), "page_token"),
    ] {
        let got = h
            .tasks
            .list_tasks(ListTasksRequest {
                parent,
                page_size: size,
                page_token: token,
                ..ListTasksRequest::default()
            })
            .await;
        refused("ListTasks", got, InvalidArgument, field);
    }
    let got = h
        .tasks
        .list_tasks(ListTasksRequest {
            parent: ocr.clone(),
            state: 99,
            ..ListTasksRequest::default()
        })
        .await;
    refused("ListTasks unknown state", got, InvalidArgument, "state");
    // Partitions past any pipeline's, or more of them than a pipeline may have.
    for partitions in [vec![1024], (0..2000).collect()] {
        let list = ListTasksRequest {
            parent: ocr.clone(),
            partitions: partitions.clone(),
            ..ListTasksRequest::default()
        };
        let got = h.tasks.list_tasks(list).await;
        refused("ListTasks", got, InvalidArgument, "partitions");
        let stats = GetPipelineStatsRequest {
            name: ocr.clone(),
            partitions,
        };
        let got = h.pipelines.get_pipeline_stats(stats).await;
        refused("GetPipelineStats", got, InvalidArgument, "partitions");
    }

    // AuthService: a missing credential names its field; a wrong one of any size is
    // UNAUTHENTICATED, saying no more.
    for (id, secret, code, field) in [
        ("", "s", InvalidArgument, "client_id"),
        ("c", "", InvalidArgument, "client_secret"),
        (long.as_str(), long.as_str(), Unauthenticated, ""),
    ] {
        let got = auth
            .issue_token(IssueTokenRequest {
                client_id: id.into(),
                client_secret: secret.into(),
            })
            .await;
        refused("IssueToken", got, code, field);
    }

    // AgentService: the first message must be a Hello, and it is checked whole.
    let hello = Hello {
        agent_id: "a".into(),
        slots: 1,
        protocol_min: pm_proto::AGENT_PROTOCOL_VERSION,
        protocol_max: pm_proto::AGENT_PROTOCOL_VERSION,
        ..Hello::default()
    };
    for (first, field) in [
        (
            Hello {
                slots: 0,
                ..hello.clone()
            },
            "hello.slots",
        ),
        (
            Hello {
                agent_id: long.clone(),
                ..hello.clone()
            },
            "hello.agent_id",
        ),
        (
            Hello {
                pipelines: vec![long.clone()],
                ..hello.clone()
            },
            "hello.pipelines[0]",
        ),
        (
            Hello {
                partitions: vec![1024],
                ..hello.clone()
            },
            "hello.partitions",
        ),
    ]
    .map(|(hello, field)| (agent_message::Message::Hello(hello), field))
    // The gateway reads only the first message of an agent's stream and forwards the rest as
    // bytes: that first message must be Hello (and decode, below).
    .into_iter()
    .chain([(
        agent_message::Message::Credit(Credit { slots: 1 }),
        "message",
    )]) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(AgentMessage {
            message: Some(first),
        })
        .unwrap();
        let got = agents.connect(UnboundedReceiverStream::new(rx)).await;
        refused(
            &format!("Connect {field}"),
            got.map(|_| ()),
            InvalidArgument,
            field,
        );
    }
    let garbage = bytes::Bytes::from_static(&[0xff, 0xff, 0xff]);
    let got = raw_agents.connect(tokio_stream::once(garbage)).await;
    refused(
        "Connect garbage",
        got.map(|_| ()),
        InvalidArgument,
        "message",
    );
    h.dev.stop().await;

    // RunnerService is served by the agent (`pm-agent --runner-listen`), not the gateway.
    let server = super::RunnerServer::start().await;
    let mut runner = pm_proto::v1::runner_service_client::RunnerServiceClient::new(
        pm_proto::client::channel(&server.endpoint).unwrap(),
    );
    let uses_url = "stages: [{name: s, jobs: [{name: j, commands: ['echo {{url}}']}]}]";
    let document = |doc: &str, params: &[(&str, &str)]| RunRequest {
        source: Some(run_request::Source::SpecDocument(doc.into())),
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        input: None,
    };
    for (what, input) in bad_inputs() {
        let request = RunRequest {
            input: Some(input),
            ..document(uses_url, &[("url", "x")])
        };
        let got = runner.run(request).await.map(|_| ());
        refused(&format!("Run {what}"), got, InvalidArgument, "input");
    }
    for (what, request, field) in [
        ("Run without a spec", RunRequest::default(), "source"),
        (
            "Run with no stages",
            document("stages: []", &[]),
            "spec_document.stages",
        ),
        (
            "Run missing a parameter",
            document(uses_url, &[]),
            "params.url",
        ),
        (
            "Run with an undeclared parameter",
            document(uses_url, &[("url", "x"), ("other", "y")]),
            "params.other",
        ),
    ] {
        let got = runner.run(request).await.map(|_| ());
        refused(what, got, InvalidArgument, field);
    }
    server.stop().await;

    // Every public RPC has rows here.
    let covered = COVERED.lock().unwrap().clone();
    let requests = public_requests();
    let public: BTreeSet<String> = requests.keys().cloned().collect();
    let missing: Vec<&String> = public.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "public RPCs with no bad-input row: {missing:?}"
    );
    let unknown: Vec<&String> = covered.difference(&public).collect();
    assert!(unknown.is_empty(), "rows naming no public RPC: {unknown:?}");
    assert!(public.len() >= 24, "the descriptor lists {public:?}");

    // Every field of every public request has a row, or a reason in `NO_ROW`.
    let fields: BTreeSet<(String, String)> = FIELDS
        .lock()
        .unwrap()
        .iter()
        .map(|(method, first)| (method.clone(), field_key(&requests[method], first)))
        .collect();
    let all: BTreeSet<(String, String)> = requests
        .iter()
        .flat_map(|(method, input)| {
            input
                .field
                .iter()
                .map(move |f| (method.clone(), field_key(input, f.name())))
        })
        .collect();
    let exempt: BTreeSet<(String, String)> = NO_ROW
        .iter()
        .map(|(m, f, _)| (m.to_string(), f.to_string()))
        .collect();
    let missing: Vec<_> = all
        .difference(&fields)
        .filter(|f| !exempt.contains(f))
        .collect();
    assert!(
        missing.is_empty(),
        "request fields with no bad-input row: {missing:?}"
    );
    let stale: Vec<_> = exempt.difference(&all).collect();
    assert!(
        stale.is_empty(),
        "NO_ROW names fields no request has: {stale:?}"
    );
    let needless: Vec<_> = exempt.intersection(&fields).collect();
    assert!(
        needless.is_empty(),
        "NO_ROW names fields that have rows: {needless:?}"
    );
}
