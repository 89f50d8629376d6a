//! A rejection: the one value every stage returns when a request must stop.
//!
//! It carries the HTTP status and the stable `code` clients and dashboards
//! key on, and renders the OpenAI error shape. Messages are static or built
//! from gateway-side facts only: never a token, a key or an internal address.

use std::borrow::Cow;

use bytes::Bytes;
use http::HeaderName;

/// Declares the stable codes in one table: the variant and the string
/// clients, dashboards and tests outside the project key on.
macro_rules! reject_codes {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// The stable `code` of a rejection.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum RejectCode {
            $($variant,)*
            /// A policy's own denial code: validated and interned, so the set
            /// stays bounded (`policy::intern_code`).
            Policy(&'static str),
        }

        impl RejectCode {
            pub fn as_str(self) -> &'static str {
                match self {
                    $(RejectCode::$variant => $name,)*
                    RejectCode::Policy(code) => code,
                }
            }
        }
    };
}

reject_codes! {
    AuthRateLimited => "auth_rate_limited",
    BodyTooLarge => "body_too_large",
    BudgetExceeded => "budget_exceeded",
    ConcurrencyLimitExceeded => "concurrency_limit_exceeded",
    ExtAuthzDenied => "ext_authz_denied",
    FeatureNotAllowed => "feature_not_allowed",
    GatewayOverloaded => "gateway_overloaded",
    HeadersTooLarge => "headers_too_large",
    IdentityMismatch => "identity_mismatch",
    InternalError => "internal_error",
    InvalidApiKey => "invalid_api_key",
    InvalidJson => "invalid_json",
    InvalidPath => "invalid_path",
    InvalidRequest => "invalid_request",
    InvalidToken => "invalid_token",
    MethodNotAllowed => "method_not_allowed",
    ModelNotFound => "model_not_found",
    MissingCredentials => "missing_credentials",
    ModelNotAllowed => "model_not_allowed",
    PolicyDenied => "policy_denied",
    PiiDetected => "pii_detected",
    PolicyError => "policy_error",
    PromptBlocked => "prompt_blocked",
    PromptTooLong => "prompt_too_long",
    RateLimitExceeded => "rate_limit_exceeded",
    RegionNotAllowed => "region_not_allowed",
    RequestTimeout => "request_timeout",
    ResponseNotFound => "response_not_found",
    RouteNotAllowed => "route_not_allowed",
    RouteNotFound => "route_not_found",
    SchemaViolation => "schema_violation",
    TenantSuspended => "tenant_suspended",
    TokensQuotaExceeded => "tokens_quota_exceeded",
    UnknownTenant => "unknown_tenant",
    UnsupportedMediaType => "unsupported_media_type",
    UpstreamTimeout => "upstream_timeout",
    UpstreamUnavailable => "upstream_unavailable",
    UriTooLong => "uri_too_long",
}

impl std::fmt::Display for RejectCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// So a test can say `assert_eq!(r.code, "invalid_json")`.
impl PartialEq<&str> for RejectCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Which API's error shape a refusal takes: the route's dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    OpenAi,
    Anthropic,
}

/// Why a request was refused, in the OpenAI error shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub code: RejectCode,
    pub message: Cow<'static, str>,
    /// The request field at fault, as OpenAI's `param`.
    pub param: Option<String>,
    /// Extra response headers, such as `Allow` on a 405.
    pub headers: Vec<(HeaderName, String)>,
    /// A body relayed as is (an external authorizer's denial) instead of
    /// the OpenAI shape, with its content type.
    /// Boxed: it is rare, and `Reject` travels in every stage's `Result`.
    pub raw_body: Option<Box<(Option<String>, Bytes)>>,
}

impl Reject {
    pub fn new(status: u16, code: RejectCode, message: impl Into<Cow<'static, str>>) -> Self {
        Reject {
            status,
            code,
            message: message.into(),
            param: None,
            headers: Vec::new(),
            raw_body: None,
        }
    }

    pub fn with_raw_body(mut self, content_type: Option<String>, body: Bytes) -> Self {
        self.raw_body = Some(Box::new((content_type, body)));
        self
    }

    pub fn with_header(mut self, name: HeaderName, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn bad_request(code: RejectCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(400, code, message)
    }
    pub fn unauthorized(code: RejectCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(401, code, message)
    }
    pub fn forbidden(code: RejectCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(403, code, message)
    }

    /// OpenAI's `type` for this status.
    pub fn error_type(&self) -> &'static str {
        match self.status {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The content type and body to send, in the route's error shape.
    pub fn content(&self, shape: ErrorShape, request_id: &str) -> (&str, Bytes) {
        match (self.raw_body.as_deref(), shape) {
            (Some((ct, body)), _) => (
                ct.as_deref().unwrap_or("application/octet-stream"),
                body.clone(),
            ),
            (None, ErrorShape::OpenAi) => ("application/json", Bytes::from(self.body())),
            (None, ErrorShape::Anthropic) => (
                "application/json",
                Bytes::from(self.anthropic_body(request_id)),
            ),
        }
    }

    /// Anthropic's `type` for this status, which its SDK maps to an
    /// exception class.
    pub fn anthropic_error_type(&self) -> &'static str {
        match self.status {
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            500..=599 => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// `{"type":"error","error":{"type","message","code"},"request_id"}`:
    /// Anthropic's shape, with the Portcullis code beside its type.
    pub fn anthropic_body(&self, request_id: &str) -> Vec<u8> {
        let body = serde_json::json!({
            "type": "error",
            "error": {
                "type": self.anthropic_error_type(),
                "message": self.message,
                "code": self.code.as_str(),
                "param": self.param,
            },
            "request_id": request_id,
        });
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// The JSON body: `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.error_type(),
                "param": self.param,
                "code": self.code.as_str(),
            }
        });
        // Serialising a `Value` built from strings cannot fail.
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_openai_shape() {
        let r = Reject::forbidden(RejectCode::TenantSuspended, "tenant is suspended");
        let v: serde_json::Value = serde_json::from_slice(&r.body()).unwrap();
        assert_eq!(v["error"]["code"], "tenant_suspended");
        assert_eq!(v["error"]["type"], "permission_error");
        assert_eq!(v["error"]["message"], "tenant is suspended");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn renders_the_anthropic_shape_with_the_portcullis_code() {
        for (status, kind) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "invalid_request_error"),
            (413, "invalid_request_error"),
            (429, "rate_limit_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
        ] {
            let r = Reject::new(status, RejectCode::RateLimitExceeded, "m");
            let (_, body) = r.content(ErrorShape::Anthropic, "req1");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], kind, "{status}");
            assert_eq!(v["error"]["code"], "rate_limit_exceeded");
            assert_eq!(v["request_id"], "req1");
        }
    }
}
