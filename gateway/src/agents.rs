//! Agents' streams through the gateway: the gateway reads Hello to learn which pipelines the
//! agent serves (within its token's scope), opens the same stream to the shard that owns
//! them, and splices the two.

use futures::Stream;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use pm_proto::v1::agent_service_server::AgentService;
use pm_proto::v1::{AgentMessage, ServerMessage, agent_message};

use crate::auth::Caller;
use crate::authz::{self, Rpc};
use crate::routing::Routes;

pub struct Agents {
    routes: Routes,
}

impl Agents {
    pub fn new(routes: Routes) -> Self {
        Self { routes }
    }
}

/// Confines an agent's Hello to the pipelines its token names: an empty list becomes those
/// pipelines, one outside them is PERMISSION_DENIED. Only a platform admin (or anyone with
/// auth off) serves every pipeline.
#[allow(clippy::result_large_err)]
fn scope(caller: &Caller, pipelines: &mut Vec<String>) -> Result<(), Status> {
    let Caller::Token(claims) = caller else {
        return Ok(());
    };
    if claims.is_platform_admin() {
        return Ok(());
    }
    if pipelines.is_empty() {
        if claims.pipelines.is_empty() {
            return Err(Status::permission_denied(format!(
                "{} may serve no pipeline; serving every pipeline takes a platform admin",
                claims.sub
            )));
        }
        pipelines.clone_from(&claims.pipelines);
        return Ok(());
    }
    for (i, p) in pipelines.iter().enumerate() {
        if !claims.pipelines.contains(p) {
            return Err(Status::permission_denied(format!(
                "hello.pipelines[{i}]: {} may not serve {p}",
                claims.sub
            )));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl AgentService for Agents {
    type ConnectStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let caller = Caller::of(&request)?;
        authz::authorize(&caller, Rpc::Connect, None)?;
        let mut inbound = request.into_inner();
        let mut h = pm_proto::agent::read_hello(&mut inbound).await?;
        scope(&caller, &mut h.pipelines)?;
        let pipelines = h.pipelines.clone();
        let hello = AgentMessage {
            message: Some(agent_message::Message::Hello(h)),
        };
        // The shard reads Hello before it answers, so a shard that does not own the
        // pipelines refuses before anything else is sent: each attempt gets the Hello and a
        // fresh channel, and the agent's own stream is joined to the one that is accepted.
        let mut accepted = None;
        let response = self
            .routes
            .call_agents(&pipelines, |mut shard| {
                let (tx, rx) = mpsc::channel(64);
                let _ = tx.try_send(hello.clone());
                accepted = Some(tx);
                async move { shard.connect(ReceiverStream::new(rx)).await }
            })
            .await?;
        let tx = accepted.expect("a call was made");
        // The agent's messages until its stream ends or breaks; the shard sees the end.
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if tx.send(m).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(response.into_inner())))
    }
}
