//! Status constructors every service shares, so a field error looks the same wherever it is
//! raised: INVALID_ARGUMENT, a message starting with the field path, and a
//! `google.rpc.BadRequest` detail naming the field for clients that read details.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Most bytes of a status message. The message travels in the `grpc-message` header, and
/// a header past the peer's limit turns the whole answer into INTERNAL.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// `status` with its message cut to [`MAX_MESSAGE_BYTES`] (on a character boundary, marked
/// "..."), its code, details and metadata kept: every service's error mapping ends here, so no
/// input echoed into a message can break the answer.
pub fn bounded(status: Status) -> Status {
    let message = status.message();
    if message.len() <= MAX_MESSAGE_BYTES {
        return status;
    }
    let mut end = MAX_MESSAGE_BYTES - 3;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let cut = format!("{}...", &message[..end]);
    Status::with_details_and_metadata(
        status.code(),
        cut,
        status.details().to_vec().into(),
        status.metadata().clone(),
    )
}

/// INVALID_ARGUMENT naming `field`.
pub fn invalid_argument(field: &str, description: &str) -> Status {
    let message = if field.is_empty() {
        description.to_owned()
    } else {
        format!("{field}: {description}")
    };
    Status::with_error_details(
        Code::InvalidArgument,
        message,
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

/// The field a status names: its BadRequest detail's first field, if any.
pub fn violated_field(status: &Status) -> Option<String> {
    status
        .get_details_bad_request()
        .and_then(|bad| bad.field_violations.into_iter().next())
        .map(|v| v.field)
}

/// RESOURCE_EXHAUSTED with a retry hint (`google.rpc.RetryInfo`).
pub fn resource_exhausted(message: String, retry_after: std::time::Duration) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}

/// UNAVAILABLE with a retry hint.
pub fn unavailable(message: String, retry_after: std::time::Duration) -> Status {
    Status::with_error_details(
        Code::Unavailable,
        message,
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}

/// Metadata keys of a "not the owner" answer (see `pm.internal.v1.ShardService`).
pub const RING_REVISION: &str = "pm-ring-revision";
pub const OWNER_ID: &str = "pm-owner-id";
pub const OWNER_ADDRESS: &str = "pm-owner-address";

/// A shard's answer for a ring key it does not own: whom it believes owns it, and at which
/// ring revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotOwner {
    pub revision: u64,
    /// `(id, address)`; `None` when no shard is registered.
    pub owner: Option<(String, String)>,
}

impl NotOwner {
    /// FAILED_PRECONDITION with the ring view in the metadata.
    pub fn to_status(&self, message: String) -> Status {
        let mut status = Status::failed_precondition(message);
        let md = status.metadata_mut();
        if let Ok(v) = self.revision.to_string().parse() {
            md.insert(RING_REVISION, v);
        }
        if let Some((id, address)) = &self.owner
            && let (Ok(id), Ok(address)) = (id.parse(), address.parse())
        {
            md.insert(OWNER_ID, id);
            md.insert(OWNER_ADDRESS, address);
        }
        status
    }

    /// The ring view of a "not the owner" answer; `None` for any other status.
    pub fn from_status(status: &Status) -> Option<Self> {
        if status.code() != Code::FailedPrecondition {
            return None;
        }
        let md = status.metadata();
        let revision = md.get(RING_REVISION)?.to_str().ok()?.parse().ok()?;
        let text = |key| Some(md.get(key)?.to_str().ok()?.to_owned());
        let owner = text(OWNER_ID).zip(text(OWNER_ADDRESS));
        Some(Self { revision, owner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_owner_round_trips_through_a_status() {
        let n = NotOwner {
            revision: 42,
            owner: Some(("pm-shard-1".into(), "http://10.0.0.1:50053".into())),
        };
        let status = n.to_status("not mine".into());
        assert_eq!(NotOwner::from_status(&status), Some(n));
        assert_eq!(
            NotOwner::from_status(&Status::failed_precondition("x")),
            None
        );
    }
}
