//! The shard's errors and their one mapping to `tonic::Status`.

use std::time::Duration;

use tonic::Status;

use pm_spec::Violation;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(Violation),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{what}")]
    ResourceExhausted { what: String, retry_after: Duration },
    /// A conflicting change is being written; retrying shortly will see its outcome.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    /// A task named its spec by id, and this shard does not hold that spec.
    #[error("spec {} is not held by this shard; send the task again with its spec", hex(.0))]
    SpecNeeded(pm_spec::SpecId),
    /// A call on a ring key this shard does not own.
    #[error("{message}")]
    NotOwner {
        message: String,
        view: pm_proto::status::NotOwner,
    },
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(Violation::new(field, description))
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        pm_proto::status::bounded(match e {
            Error::InvalidArgument(v) => {
                pm_proto::status::invalid_argument(&v.field, &v.description)
            }
            Error::NotFound(what) => Status::not_found(format!("{what} not found")),
            Error::FailedPrecondition(why) => Status::failed_precondition(why),
            e @ Error::SpecNeeded(_) => Status::failed_precondition(e.to_string()),
            Error::ResourceExhausted { what, retry_after } => {
                pm_proto::status::resource_exhausted(what, retry_after)
            }
            Error::Aborted(why) => Status::aborted(why),
            Error::Unavailable(why) => pm_proto::status::unavailable(why, Duration::from_secs(1)),
            Error::NotOwner { message, view } => view.to_status(message),
        })
    }
}

/// The same mapping for one refused task of a batch.
impl From<Error> for pm_proto::v1::Error {
    fn from(e: Error) -> Self {
        let field = match &e {
            Error::InvalidArgument(v) => v.field.clone(),
            _ => String::new(),
        };
        let status = Status::from(e);
        pm_proto::v1::Error {
            code: status.code() as i32,
            message: status.message().to_owned(),
            field,
        }
    }
}
