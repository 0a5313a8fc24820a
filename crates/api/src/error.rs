//! Every failure becomes a response here, and only here.

use axum::Json;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use stampede_engine::{AdminError, OrderError, PurchaseError};
use stampede_types::InvalidInput;
use utoipa::ToSchema;

/// `{"error": {"code": "...", "message": "..."}}`
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, snake_case; clients branch on this.
    pub code: &'static str,
    /// For humans; may change.
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_s: Option<u32>,
    /// A per-key limit (one shopper, one sale) refused it after the route's own rules
    /// admitted it; the response carries [`PerKeyRefusal`] so the guard's middleware
    /// gives the route's rate slot back.
    pub per_key: bool,
}

/// Response extension: the request was refused by a per-key limit inside its handler.
#[derive(Clone, Copy, Debug)]
pub struct PerKeyRefusal;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
            per_key: false,
        }
    }
    /// A per-key limit's refusal (see [`ApiError::per_key`]).
    pub fn per_key(rejection: stampede_guard::Rejection) -> Self {
        let mut error = ApiError::from(rejection);
        error.per_key = true;
        error
    }
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    /// 413 `body_too_large`: whoever read the body found it over the limit.
    pub fn body_too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message)
    }
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message).retry_after(1)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(1)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.per_key {
            response.extensions_mut().insert(PerKeyRefusal);
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is never read, so this connection cannot carry another
            // request: say so, or a client's pool would reuse it and meet a broken pipe.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<InvalidInput> for ApiError {
    fn from(error: InvalidInput) -> Self {
        ApiError::bad_request("invalid_field", error.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::bad_request("malformed_json", e.body_text())
            }
            JsonRejection::JsonDataError(e) => ApiError::bad_request("invalid_body", e.body_text()),
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send Content-Type: application/json",
            ),
            JsonRejection::BytesRejection(e) => from_bytes_rejection(e),
            other => ApiError::bad_request("invalid_body", other.body_text()),
        }
    }
}

pub fn from_bytes_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::body_too_large(rejection.body_text())
    } else {
        ApiError::bad_request("invalid_body", rejection.body_text())
    }
}

/// The error for a body `json` that did not deserialize: `malformed_json` when it is
/// not JSON at all, `invalid_body` when it is but has the wrong shape. serde_json stops
/// at the first error it meets, and calls it by what it met: a shape error (an unknown
/// field) in a body cut short after it, or a syntax error where an array stands for a
/// unit variant's name. So the whole body is checked instead (only on this error path).
/// A body that is not UTF-8 is not JSON (RFC 8259 §8.1), although serde skims over the
/// bytes of a string it ignores.
pub fn from_serde(error: serde_json::Error, json: &[u8]) -> ApiError {
    let code = if is_json(json) {
        "invalid_body"
    } else {
        "malformed_json"
    };
    ApiError::bad_request(code, error.to_string())
}

/// Whether `json` is JSON at all, of whatever shape: UTF-8 throughout and one value.
/// What tells `malformed_json` from `invalid_body` wherever a body is refused.
pub(crate) fn is_json(json: &[u8]) -> bool {
    std::str::from_utf8(json).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(json).is_ok()
}

impl From<PurchaseError> for ApiError {
    fn from(error: PurchaseError) -> Self {
        let message = error.to_string();
        match error {
            PurchaseError::SaleNotFound => ApiError::not_found("sale_not_found", message),
            PurchaseError::NotStarted => {
                ApiError::new(StatusCode::CONFLICT, "not_started", message)
            }
            PurchaseError::Ended => ApiError::new(StatusCode::CONFLICT, "ended", message),
            PurchaseError::SoldOut { .. } => {
                ApiError::new(StatusCode::CONFLICT, "sold_out", message)
            }
            PurchaseError::LimitExceeded { .. } | PurchaseError::ClosedLimitExceeded { .. } => {
                ApiError::new(StatusCode::CONFLICT, "limit_exceeded", message)
            }
            PurchaseError::KeyReused => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                message,
            ),
            PurchaseError::Overloaded => ApiError::overloaded(message),
            PurchaseError::Unavailable => ApiError::unavailable(message),
            PurchaseError::CircuitOpen { retry_after_ms } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "circuit_open", message)
                    .retry_after(retry_after_ms.div_ceil(1000).clamp(1, 3600) as u32)
            }
        }
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
fn retry_seconds(d: std::time::Duration) -> u32 {
    (d.as_millis() as u64).div_ceil(1000).clamp(1, 3600) as u32
}

impl From<stampede_guard::Rejection> for ApiError {
    fn from(rejection: stampede_guard::Rejection) -> Self {
        use stampede_guard::Rejection;
        let retry = retry_seconds(rejection.retry_after());
        match rejection {
            Rejection::Throttled { rule, .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                format!("too many requests ({rule}); retry later"),
            ),
            Rejection::Overloaded { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the server is at capacity; retry later",
            ),
            Rejection::Degraded { class } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "degraded",
                format!("{} requests are switched off for now", class.name()),
            ),
            Rejection::CircuitOpen { name, .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "circuit_open",
                format!("{name} is unavailable; retry later"),
            ),
        }
        .retry_after(retry)
    }
}

impl From<OrderError> for ApiError {
    fn from(error: OrderError) -> Self {
        let message = error.to_string();
        match error {
            OrderError::NotFound => ApiError::not_found("order_not_found", message),
            OrderError::Expired => ApiError::new(StatusCode::CONFLICT, "order_expired", message),
            OrderError::Cancelled => {
                ApiError::new(StatusCode::CONFLICT, "order_cancelled", message)
            }
            OrderError::Paid => ApiError::new(StatusCode::CONFLICT, "order_paid", message),
            OrderError::PaymentFailed(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "payment_failed", message)
            }
            OrderError::PaymentTimeout => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "payment_timeout", message)
            }
            OrderError::PaymentCircuitOpen(retry_after_ms) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "circuit_open", message)
                    .retry_after(retry_after_ms.div_ceil(1000).clamp(1, 3600) as u32)
            }
            OrderError::PaymentThrottled(retry_after_ms) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "throttled", message)
                    .retry_after(retry_after_ms.div_ceil(1000).clamp(1, 3600) as u32)
            }
            OrderError::Overloaded | OrderError::AuditsBusy => ApiError::overloaded(message),
            OrderError::Unavailable => ApiError::unavailable(message),
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(error: AdminError) -> Self {
        let message = error.to_string();
        match error {
            AdminError::SkuExists => ApiError::new(StatusCode::CONFLICT, "sku_exists", message),
            AdminError::ProductNotFound => ApiError::not_found("product_not_found", message),
            AdminError::InsufficientStock { .. } => {
                ApiError::new(StatusCode::CONFLICT, "insufficient_stock", message)
            }
            AdminError::Invalid(_) => ApiError::bad_request("invalid_field", message),
            AdminError::Overloaded => ApiError::overloaded(message),
            AdminError::Unavailable => ApiError::unavailable(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Not JSON (cut short, not UTF-8 even inside a string) is `malformed_json`; JSON of
    /// the wrong shape is `invalid_body`, whichever category serde_json gives it.
    #[test]
    fn malformed_is_told_from_misshapen() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        enum Class {
            Browse,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Body {
            class: Class,
            name: String,
        }
        let code = |json: &[u8]| {
            let error = serde_json::from_slice::<Body>(json).unwrap_err();
            from_serde(error, json).code
        };
        assert_eq!(
            code(br#"{"class": ["Browse"], "name": "x"}"#),
            "invalid_body"
        );
        assert_eq!(code(br#"{"class": "Browse", "name": 1}"#), "invalid_body");
        assert_eq!(
            code(br#"{"class": "Browse", "name": "x""#),
            "malformed_json"
        );
        assert_eq!(
            code(b"{\"class\": \"Browse\", \"name\": \"\xff\"}"),
            "malformed_json"
        );
        assert_eq!(
            code(b"{\"class\": \"Browse\", \"other\": \"\xff\"}"),
            "malformed_json"
        ); // A shape error met first, in a body cut short after it: still not JSON.
        assert_eq!(code(br#"{"class": "Other", "name": "#), "malformed_json");
    }
}
