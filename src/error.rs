//! The driver's error type and the one place where errors become gRPC status codes.
//! Lower layers (backend, host) have their own error enums; they convert into [`Error`] here,
//! and [`Error`] converts into [`tonic::Status`] with the code the CSI spec names.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Another operation on the same object is in flight; the caller retries.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let code = match &err {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Aborted(_) => Code::Aborted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Internal(_) => Code::Internal,
        };
        Status::new(code, clip(&err.to_string(), MAX_MESSAGE_BYTES))
    }
}

/// Longest status message sent. Messages quote request fields, a field can be a megabyte, and
/// the message travels in an HTTP/2 trailer that clients cap (a few KiB to 16 KiB): past the cap
/// the caller sees a protocol error instead of the code the spec names.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes on a character boundary, with "..." when cut.
pub fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let cut = (0..=max.saturating_sub(3))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}...", &s[..cut]).into()
}

impl From<crate::storage::Error> for Error {
    fn from(err: crate::storage::Error) -> Error {
        use crate::storage::Error as B;
        let msg = err.to_string();
        match err {
            B::NotFound(_) => Error::NotFound(msg),
            B::AlreadyExists(_) => Error::AlreadyExists(msg),
            B::InUse(_) => Error::FailedPrecondition(msg),
            B::Exhausted(_) => Error::ResourceExhausted(msg),
            B::OutOfRange(_) => Error::OutOfRange(msg),
            B::Unavailable(_) => Error::Unavailable(msg),
            B::Conflict(_) => Error::FailedPrecondition(msg),
            B::InvalidToken(_) => Error::Aborted(msg),
            B::Unsupported(_) => Error::Unimplemented(msg),
            B::Io { .. } | B::Corrupt(_) => Error::Internal(msg),
        }
    }
}

impl From<crate::host::Error> for Error {
    fn from(err: crate::host::Error) -> Error {
        use crate::host::Error as H;
        match err {
            H::MissingTool(_) => Error::FailedPrecondition(err.to_string()),
            H::Busy(_) => Error::FailedPrecondition(err.to_string()),
            H::Symlink(_) => Error::InvalidArgument(err.to_string()),
            H::Timeout { .. } => Error::Unavailable(err.to_string()),
            H::Io { .. } | H::Command { .. } => Error::Internal(err.to_string()),
        }
    }
}

/// The canonical upper-case name of a gRPC code, as the gRPC and CSI specs write it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_maps_to_its_code() {
        let cases = [
            (Error::InvalidArgument("x".into()), Code::InvalidArgument),
            (Error::NotFound("x".into()), Code::NotFound),
            (Error::AlreadyExists("x".into()), Code::AlreadyExists),
            (
                Error::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (Error::OutOfRange("x".into()), Code::OutOfRange),
            (
                Error::ResourceExhausted("x".into()),
                Code::ResourceExhausted,
            ),
            (Error::Aborted("x".into()), Code::Aborted),
            (Error::Unavailable("x".into()), Code::Unavailable),
            (Error::Internal("x".into()), Code::Internal),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }

    #[test]
    fn long_messages_are_clipped_on_a_character_boundary() {
        let long = format!("volume {:?} not found", "é".repeat(100_000));
        let status = Status::from(Error::NotFound(long));
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
        assert!(status.message().ends_with("..."));
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdefghij", 6), "abc...");
    }

    #[test]
    fn backend_errors_keep_their_meaning() {
        use crate::storage::Error as B;
        let cases = [
            (B::NotFound("volume v".into()), Code::NotFound),
            (B::AlreadyExists("name n".into()), Code::AlreadyExists),
            (B::InUse("volume v".into()), Code::FailedPrecondition),
            (B::Exhausted("pool".into()), Code::ResourceExhausted),
            (B::OutOfRange("size".into()), Code::OutOfRange),
            (B::Unavailable("pool".into()), Code::Unavailable),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(Error::from(err)).code(), code);
        }
    }
}
