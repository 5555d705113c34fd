//! TLS and mTLS with real processes: tenant-service, a shard and a gateway with certificates
//! of one CA (made here with rcgen), an agent that verifies the gateway. A task runs end to
//! end over TLS; a plaintext client, a client without a certificate and one with a
//! certificate of another CA are refused by the internal port; a rotated certificate is
//! served without a restart; the plaintext health-only port serves probes and nothing else.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::CertificateDer;
use tonic::transport::Endpoint;

use pm_proto::tls::{Tls, TlsFiles};
use pm_proto::v1::*;

use super::Proc;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names`, written as `<stem>.crt` and `<stem>.key` in `dir`; returns its DER.
    fn leaf(&self, dir: &Path, stem: &str, names: &[&str]) -> CertificateDer<'static> {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        // Written beside, then renamed: a reader never sees half a file.
        for (ext, text) in [("key", key.serialize_pem()), ("crt", cert.pem())] {
            let tmp = dir.join(format!("{stem}.{ext}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.join(format!("{stem}.{ext}"))).unwrap();
        }
        cert.der().clone()
    }
}

fn tls_args(dir: &Path, stem: &str) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.join(format!("{stem}.crt")).display().to_string(),
        "--tls-key".into(),
        dir.join(format!("{stem}.key")).display().to_string(),
        "--tls-ca".into(),
        dir.join("ca.pem").display().to_string(),
    ]
}

/// A client configuration: trusting `ca`, presenting `identity` if given.
fn client(dir: &Path, ca: &str, identity: Option<&str>) -> Arc<rustls::ClientConfig> {
    let files = TlsFiles {
        identity: identity.map(|stem| {
            (
                dir.join(format!("{stem}.crt")),
                dir.join(format!("{stem}.key")),
            )
        }),
        ca: dir.join(ca),
    };
    Tls::new(&files).unwrap().client
}

fn endpoint(port: u16) -> Endpoint {
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
}

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The certificate the server at `port` presents now.
async fn served_cert(port: u16, config: Arc<rustls::ClientConfig>) -> Option<Vec<u8>> {
    let uri: http::Uri = format!("https://127.0.0.1:{port}").parse().unwrap();
    let stream = pm_proto::tls::connect(config, uri).await.ok()?;
    let certs = stream.get_ref().1.peer_certificates()?;
    Some(certs.first()?.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_speak_mtls_refuse_strangers_and_reload_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new("pm test CA");
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    let names = ["localhost", "127.0.0.1"];
    for stem in ["tenants", "shard", "gateway", "client"] {
        ca.leaf(dir, stem, &names);
    }
    let rogue = Ca::new("another CA");
    std::fs::write(dir.join("rogue-ca.pem"), &rogue.pem).unwrap();
    rogue.leaf(dir, "rogue", &names);

    // Every port is the kernel's pick, read back from the logs.
    let mut args = vec![
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--data-dir".into(),
        dir.join("meta").display().to_string(),
    ];
    args.extend(tls_args(dir, "tenants"));
    let tenants_log = dir.join("tenants.log");
    let (_tenants, tenants) = Proc::spawn_serving(
        "pm-tenant-service",
        &args,
        &tenants_log,
        "tenant-service serving",
    )
    .await;
    let mut args = vec![
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--data-dir".into(),
        dir.join("shard-data").display().to_string(),
        "--health-listen".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(tls_args(dir, "shard"));
    let shard_log = dir.join("shard.log");
    let (mut shard, shard_addr) =
        Proc::spawn_serving("pm-shard", &args, &shard_log, "shard serving").await;
    let health_port =
        super::common::logged_addr(&shard_log, 0, "health port listening", &mut shard.0)
            .await
            .port();
    let shard_port = shard_addr.port();
    let mut args = vec![
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--tenant-service".into(),
        format!("https://{tenants}"),
        "--shard".into(),
        format!("https://{shard_addr}"),
        // Tokens are tested elsewhere; here the transport.
        "--insecure-no-auth".into(),
    ];
    args.extend(tls_args(dir, "gateway"));
    let gateway_log = dir.join("gateway.log");
    let (_gateway, gateway) =
        Proc::spawn_serving("pm-gateway", &args, &gateway_log, "gateway serving").await;
    let gateway_port = gateway.port();

    // A client that trusts the CA and has no certificate: the public port lets it in, and
    // the gateway reaches tenant-service and the shard over mTLS.
    let public = pm_proto::client::channel_tls(endpoint(gateway_port), client(dir, "ca.pem", None));
    let mut pipelines = pm_proto::client::pipelines(public.clone());
    until("the gateway serves over TLS", async || {
        pipelines
            .create_application(CreateApplicationRequest {
                parent: "tenants/default".into(),
                application_id: "tls".into(),
                application: None,
            })
            .await
            .is_ok()
    })
    .await;
    pipelines
        .apply_pipeline(ApplyPipelineRequest {
            parent: "tenants/default/applications/tls".into(),
            pipeline_id: "p".into(),
            source: Some(apply_pipeline_request::Source::SpecDocument(
                "stages: [{name: s, jobs: [{name: j, commands: [\"echo over-tls\"]}]}]".into(),
            )),
        })
        .await
        .unwrap();
    let agent_args = [
        "--endpoint".to_owned(),
        format!("https://localhost:{gateway_port}"),
        "--tls-ca".into(),
        dir.join("ca.pem").display().to_string(),
        "--pipeline".into(),
        "tenants/default/applications/tls/pipelines/p".into(),
        "--work-root".into(),
        dir.join("work").display().to_string(),
    ];
    let _agent = Proc::spawn("pm-agent", &agent_args, &dir.join("agent.log"));
    let mut tasks = pm_proto::client::tasks(public.clone());
    let task = tasks
        .submit_task(SubmitTaskRequest {
            parent: "tenants/default/applications/tls/pipelines/p".into(),
            ..SubmitTaskRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut done = None;
    until("the task runs over TLS", async || {
        let t = tasks
            .get_task(GetTaskRequest {
                name: task.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let finished = t.state == TaskState::Done as i32;
        done = Some(t);
        finished
    })
    .await;
    let done = done.unwrap();
    let out = &done.result.unwrap().jobs[0].steps[0].stdout;
    assert_eq!(out, "over-tls\n");

    // Plaintext to the public port: no answer.
    let plain = pm_proto::client::tasks(
        Endpoint::from_shared(format!("http://127.0.0.1:{gateway_port}"))
            .unwrap()
            .connect_lazy(),
    )
    .get_task(GetTaskRequest {
        name: task.name.clone(),
    })
    .await;
    assert!(plain.is_err(), "plaintext answered: {plain:?}");

    // The shard's internal port: a certificate of the CA is needed.
    let health = |config| async move {
        let channel = pm_proto::client::channel_tls(endpoint(shard_port), config);
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
    };
    let no_cert = health(client(dir, "ca.pem", None)).await;
    assert!(no_cert.is_err(), "no client certificate: {no_cert:?}");
    let stranger = health(client(dir, "ca.pem", Some("rogue"))).await;
    assert!(stranger.is_err(), "another CA's certificate: {stranger:?}");
    let member = health(client(dir, "ca.pem", Some("client"))).await;
    assert!(member.is_ok(), "the CA's certificate: {member:?}");
    // The health-only port answers probes in plaintext, and serves nothing else.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{health_port}"))
        .unwrap()
        .connect_lazy();
    let probe = tonic_health::pb::health_client::HealthClient::new(plain.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    assert!(probe.is_ok(), "{probe:?}");
    let other = pm_proto::client::shard(plain)
        .get_task(pm_proto::v1::GetTaskRequest {
            name: task.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::Unimplemented, "{other:?}");
    // And the client checks the server: trusting only another CA, it refuses the shard.
    let wrong_trust = health(client(dir, "rogue-ca.pem", Some("rogue"))).await;
    assert!(wrong_trust.is_err(), "{wrong_trust:?}");

    // Rotation: the gateway's files are replaced; new connections get the new certificate.
    let config = client(dir, "ca.pem", None);
    let before = served_cert(gateway_port, config.clone()).await.unwrap();
    let rotated = ca.leaf(dir, "gateway", &names);
    assert_ne!(before, rotated.to_vec());
    until("the rotated certificate is served", async || {
        served_cert(gateway_port, config.clone()).await.as_deref() == Some(rotated.as_ref())
    })
    .await;
}
