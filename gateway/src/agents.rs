//! Agents' streams through the gateway: the gateway reads Hello to learn which pipelines the
//! agent serves, opens the same stream to the shard that owns them, and splices the two.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use pm_proto::status::invalid_argument;
use pm_proto::v1::agent_service_server::AgentService;
use pm_proto::v1::{AgentMessage, ServerMessage, agent_message};

use crate::routing::Routes;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

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
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s of connecting"))??;
        let Some(hello) = first else {
            return Err(invalid_argument("message", "the stream ended before Hello"));
        };
        let Some(agent_message::Message::Hello(h)) = &hello.message else {
            return Err(invalid_argument(
                "message",
                "the first message of a stream must be Hello",
            ));
        };
        let shard = self.routes.agent_shard_for(&h.pipelines);
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
