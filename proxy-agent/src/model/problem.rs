//! What could not be programmed, and why: each problem names its object and field.

use std::{fmt, sync::Arc};

use k8s_openapi::api::core::v1::Service;

use super::{Slice, Sourced};

/// Why an object (or part of one) was not programmed; the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemReason {
    Parse,
    MissingField,
    InvalidIp,
    InvalidPort,
    InvalidValue,
    UnsupportedProtocol,
    DuplicateFrontend,
    TooManyBackends,
    /// The same object (kind, namespace, name) defined again, in another file or document:
    /// the first in file name order is used.
    DuplicateObject,
    /// An annotation with a value this proxy does not know: reported, the default applies.
    IgnoredAnnotation,
}

impl ProblemReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemReason::Parse => "parse_error",
            ProblemReason::MissingField => "missing_field",
            ProblemReason::InvalidIp => "invalid_ip",
            ProblemReason::InvalidPort => "invalid_port",
            ProblemReason::InvalidValue => "invalid_value",
            ProblemReason::UnsupportedProtocol => "unsupported_protocol",
            ProblemReason::DuplicateFrontend => "duplicate_frontend",
            ProblemReason::TooManyBackends => "too_many_backends",
            ProblemReason::DuplicateObject => "duplicate_object",
            ProblemReason::IgnoredAnnotation => "ignored_annotation",
        }
    }
}

/// Something that could not be programmed, naming the object and the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub origin: Arc<str>,
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub reason: ProblemReason,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} {}/{}: field {}: {}",
            self.origin, self.kind, self.namespace, self.name, self.field, self.detail
        )
    }
}

/// An object problems can name.
pub(super) trait Named {
    fn namespace(&self) -> Option<&str>;
    fn name(&self) -> Option<&str>;
}

impl Named for Service {
    fn namespace(&self) -> Option<&str> {
        self.metadata.namespace.as_deref()
    }
    fn name(&self) -> Option<&str> {
        self.metadata.name.as_deref()
    }
}

impl Named for Slice {
    fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

pub(super) fn problem<T: Named>(
    src: &Sourced<T>,
    kind: &'static str,
    field: impl Into<String>,
    reason: ProblemReason,
    detail: impl Into<String>,
) -> Problem {
    Problem {
        origin: src.origin.clone(),
        kind,
        namespace: src.object.namespace().unwrap_or("default").into(),
        name: src.object.name().unwrap_or_default().into(),
        field: field.into(),
        reason,
        detail: detail.into(),
    }
}
