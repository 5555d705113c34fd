//! Agents' streams through the gateway: the gateway reads Hello to learn which pipelines the
//! agent serves, opens the same stream to the shard that owns them, and splices the two.

use futures::{Stream, StreamExt};
use std::pin::Pin;
use tonic::{Request, Response, Status, Streaming};

use pm_proto::v1::agent_service_server::AgentService;
use pm_proto::v1::{AgentMessage, ServerMessage, agent_message};

use crate::routing::Routes;

pub struct Agents {
    routes: Routes,
}

impl Agents {
    pub fn new(routes: Routes) -> Self {
        Self { routes }
    }
}

#[tonic::async_trait]
impl AgentService for Agents {
    type ConnectStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let h = pm_proto::agent::read_hello(&mut inbound).await?;
        let shard = self.routes.agent_shard_for(&h.pipelines);
        let hello = AgentMessage {
            message: Some(agent_message::Message::Hello(h)),
        };
        // The agent's messages until its stream ends or breaks; the shard sees the end.
        let rest = inbound
            .take_while(|m| futures::future::ready(m.is_ok()))
            .filter_map(|m| futures::future::ready(m.ok()));
        let upstream = futures::stream::once(futures::future::ready(hello)).chain(rest);
        let mut shard = shard;
        let response = shard.connect(upstream).await?;
        Ok(Response::new(Box::pin(response.into_inner())))
    }
}
