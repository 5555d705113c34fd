//! The gateway's errors and their one mapping to `tonic::Status`. Statuses from upstream
//! services pass through unchanged: they already name the field.

use tonic::Status;

use pm_spec::Violation;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(Violation),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Upstream(#[from] Status),
}

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(Violation::new(field, description))
    }
}

impl From<Violation> for Error {
    fn from(v: Violation) -> Self {
        Error::InvalidArgument(v)
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        pm_proto::status::bounded(match e {
            Error::InvalidArgument(v) => {
                pm_proto::status::invalid_argument(&v.field, &v.description)
            }
            Error::FailedPrecondition(why) => Status::failed_precondition(why),
            Error::Upstream(status) => status,
        })
    }
}

/// The same mapping for one refused task of a batch.
impl From<Error> for pm_proto::v1::Error {
    fn from(e: Error) -> Self {
        let field = match &e {
            Error::InvalidArgument(v) => v.field.clone(),
            Error::Upstream(s) => pm_proto::status::violated_field(s).unwrap_or_default(),
            Error::FailedPrecondition(_) => String::new(),
        };
        let status = Status::from(e);
        pm_proto::v1::Error {
            code: status.code() as i32,
            message: status.message().to_owned(),
            field,
        }
    }
}

/// A refused task of a batch back into a Status (for the unary SubmitTask).
pub fn status_of(e: pm_proto::v1::Error) -> Status {
    if !e.field.is_empty() && e.code == tonic::Code::InvalidArgument as i32 {
        let description = e
            .message
            .strip_prefix(&format!("{}: ", e.field))
            .unwrap_or(&e.message)
            .to_owned();
        return pm_proto::status::invalid_argument(&e.field, &description);
    }
    Status::new(tonic::Code::from(e.code), e.message)
}
