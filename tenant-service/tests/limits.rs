//! The per-tenant limits of tenant-service (`limits.rs`), through the service's own trait
//! methods over the embedded store: applications and pipelines past their counts are refused
//! with RESOURCE_EXHAUSTED naming the flag, and a pipeline keeps only its latest versions.

use std::sync::Arc;

use tonic::{Code, Request};

use pm_proto::v1::pipeline_service_server::PipelineService;
use pm_proto::v1::tenant_service_server::TenantService;
use pm_proto::v1::*;
use pm_tenant_service::Catalog;
use pm_tenant_service::limits::Limits;

fn catalog() -> Catalog {
    let store = Arc::new(pm_cluster::EmbeddedStore::in_memory());
    Catalog::with_limits(
        store,
        Limits {
            applications_per_tenant: 2,
            pipelines_per_tenant: 3,
            versions_per_pipeline: 2,
        },
    )
}

async fn application(c: &Catalog, id: &str) -> Result<Application, tonic::Status> {
    c.create_application(Request::new(CreateApplicationRequest {
        parent: "tenants/t".into(),
        application_id: id.into(),
        application: None,
    }))
    .await
    .map(|r| r.into_inner())
}

async fn apply(
    c: &Catalog,
    app: &str,
    name: &str,
    command: &str,
) -> Result<Pipeline, tonic::Status> {
    let doc = format!(
        "name: {name}\nstages:\n  - name: s\n    jobs:\n      - {{ name: j, commands: ['{command}'] }}\n"
    );
    c.apply_pipeline(Request::new(ApplyPipelineRequest {
        parent: format!("tenants/t/applications/{app}"),
        pipeline_id: String::new(),
        source: Some(apply_pipeline_request::Source::SpecDocument(doc)),
    }))
    .await
    .map(|r| r.into_inner())
}

async fn version(c: &Catalog, version: u64) -> Result<Pipeline, tonic::Status> {
    c.get_pipeline(Request::new(GetPipelineRequest {
        name: "tenants/t/applications/a/pipelines/p".into(),
        version,
    }))
    .await
    .map(|r| r.into_inner())
}

#[tokio::test]
async fn applications_pipelines_and_versions_are_bounded_per_tenant() {
    let c = catalog();
    c.create_tenant(Request::new(CreateTenantRequest {
        tenant_id: "t".into(),
        tenant: None,
    }))
    .await
    .unwrap();

    // Two applications, then refused.
    application(&c, "a").await.unwrap();
    application(&c, "b").await.unwrap();
    let refused = application(&c, "c").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-applications-per-tenant"),
        "{refused:?}"
    );

    // Three pipelines over both applications, then a fourth is refused; a new version of
    // one that exists is not a new pipeline.
    apply(&c, "a", "p", "echo 1").await.unwrap();
    apply(&c, "a", "q", "echo 1").await.unwrap();
    apply(&c, "b", "r", "echo 1").await.unwrap();
    let refused = apply(&c, "b", "s", "echo 1").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-pipelines-per-tenant"),
        "{refused:?}"
    );

    // Versions: the latest two are kept.
    for n in 2..=4 {
        let p = apply(&c, "a", "p", &format!("echo {n}")).await.unwrap();
        assert_eq!(p.version, n);
    }
    for gone in [1, 2] {
        let status = version(&c, gone).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "version {gone}: {status:?}");
    }
    assert_eq!(version(&c, 3).await.unwrap().version, 3);
    assert_eq!(version(&c, 4).await.unwrap().version, 4);
    assert_eq!(version(&c, 0).await.unwrap().version, 4, "the latest");
}
