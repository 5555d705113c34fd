//! Shared pieces of the agent protocol (`pm.v1.AgentService.Connect`): the handshake every
//! server of the stream (gateway and shard) performs the same way.

use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tonic::{Status, Streaming};

use crate::status::invalid_argument;
use crate::v1::{AgentMessage, Hello, agent_message};
use crate::{AGENT_PROTOCOL_MIN, AGENT_PROTOCOL_VERSION};

/// How long a new stream may take to say Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the first message of a stream, which must be Hello, within [`HELLO_TIMEOUT`].
pub async fn read_hello(inbound: &mut Streaming<AgentMessage>) -> Result<Hello, Status> {
    hello_of(first(inbound).await?)
}

/// The same on a stream of raw messages ([`crate::raw`]): Hello decoded, the rest left as
/// bytes.
pub async fn read_raw_hello(inbound: &mut Streaming<Bytes>) -> Result<Hello, Status> {
    let first = first(inbound)
        .await?
        .map(AgentMessage::decode)
        .transpose()
        .map_err(|e| invalid_argument("message", &format!("not an AgentMessage: {e}")))?;
    hello_of(first)
}

async fn first<T>(inbound: &mut Streaming<T>) -> Result<Option<T>, Status> {
    tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no Hello within 10s of connecting"))?
}

fn hello_of(first: Option<AgentMessage>) -> Result<Hello, Status> {
    match first.and_then(|m| m.message) {
        Some(agent_message::Message::Hello(hello)) => Ok(hello),
        None => Err(invalid_argument("message", "the stream ended before Hello")),
        Some(_) => Err(invalid_argument(
            "message",
            "the first message of a stream must be Hello",
        )),
    }
}

/// The protocol version for an agent speaking `min..=max`: the newest both sides speak, or
/// none.
pub fn protocol_for(min: u32, max: u32) -> Option<u32> {
    let version = max.min(AGENT_PROTOCOL_VERSION);
    (version >= min.max(AGENT_PROTOCOL_MIN)).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_version_both_sides_speak_is_chosen() {
        assert_eq!(AGENT_PROTOCOL_VERSION, 2);
        assert_eq!(protocol_for(1, 1), Some(1), "an agent of before parts");
        assert_eq!(protocol_for(1, 2), Some(2));
        assert_eq!(
            protocol_for(1, 9),
            Some(2),
            "a newer agent that still speaks 2"
        );
        assert_eq!(protocol_for(3, 9), None, "an agent too new");
        assert_eq!(protocol_for(0, 0), None, "no version 0");
        assert_eq!(protocol_for(2, 1), None, "an empty range");
    }
}
