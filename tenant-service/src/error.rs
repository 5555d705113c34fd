//! tenant-service's errors and their one mapping to `tonic::Status`.

use tonic::Status;

use pm_spec::Violation;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(Violation),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Exhausted(String),
    #[error(transparent)]
    Store(#[from] pm_cluster::Error),
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
            Error::NotFound(what) => Status::not_found(format!("{what} not found")),
            Error::AlreadyExists(what) => Status::already_exists(format!("{what} already exists")),
            Error::FailedPrecondition(why) => Status::failed_precondition(why),
            Error::Unauthenticated(why) => Status::unauthenticated(why),
            Error::Exhausted(why) => {
                pm_proto::status::resource_exhausted(why, std::time::Duration::from_secs(1))
            }
            // A concurrent writer won; the caller may read again and retry.
            Error::Store(e @ pm_cluster::Error::Conflict { .. }) => Status::aborted(e.to_string()),
            Error::Store(e @ pm_cluster::Error::Unavailable(_)) => {
                pm_proto::status::unavailable(e.to_string(), std::time::Duration::from_secs(1))
            }
            // A bug of ours, not the caller's: no request makes more than a few writes.
            Error::Store(e @ pm_cluster::Error::TooManyWrites { .. }) => {
                tracing::error!(error = %e, "metadata transaction too large");
                Status::internal(e.to_string())
            }
            Error::Store(e @ pm_cluster::Error::Io { .. }) => {
                tracing::error!(error = %e, "metadata store failed");
                Status::internal(e.to_string())
            }
        })
    }
}
