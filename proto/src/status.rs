//! Status constructors every service shares, so a field error looks the same wherever it is
//! raised: INVALID_ARGUMENT, a message starting with the field path, and a
//! `google.rpc.BadRequest` detail naming the field for clients that read details.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

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
