//! Route handlers: parse at the edge, call the engine, render JSON.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use stampede_engine::{NewProduct, NewSale, OrderRecord, Placed, ProductView, SaleView};
use stampede_guard::HotTaken;
use stampede_types::{
    Cents, ID_TEXT_MAX, IdempotencyKey, OrderId, OrderStatus, Quantity, SaleId, SaleStatus, Sku,
    UserId, parse_name, parse_stock,
};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::{Admin, Caller, Shopper};
use crate::error::{ApiError, ErrorBody, from_bytes_rejection, from_serde};

/// Orders returned by `GET /v1/orders`, newest first.
pub const ORDER_LIST_LEN_MAX: u32 = stampede_engine::ORDERS_LISTED_MAX as u32;
/// Latest accepted per-user limit of a sale.
pub const PER_USER_LIMIT_MAX: i64 = 1_000;

/// The route's one path parameter, percent-decoded. axum's own `Path` answers a path
/// that does not decode (`%FF`) with plain text and no code; this answers it as every
/// other bad input: 400 `invalid_path`, JSON.
pub struct PathText(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathText {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(text)| PathText(text))
            .map_err(|rejection| ApiError::bad_request("invalid_path", rejection.body_text()))
    }
}

pub fn rfc3339(ms: i64) -> String {
    let mut out = Vec::with_capacity(24);
    push_rfc3339(&mut out, ms);
    String::from_utf8(out).expect("an RFC 3339 time is ASCII")
}

/// Appends chrono's `to_rfc3339_opts(SecondsFormat::Millis, true)` of `ms` (the Unix
/// epoch for a time chrono cannot hold). Times from 1970 to 9999, every sale's, are
/// written from the civil date worked out by arithmetic (Howard Hinnant's
/// `civil_from_days`) into a stack buffer appended at once: chrono's `fmt` path and its
/// `String` were most of the cost of a purchase's answer, and chrono's date accessors
/// with a push per digit still ~1,000 instructions a time. Others go through chrono.
/// Held to chrono's text by `rfc3339_is_chronos_for_any_time`.
fn push_rfc3339(out: &mut Vec<u8>, ms: i64) {
    /// 10000-01-01T00:00:00Z: from here chrono writes a sign and five digits.
    const YEAR_10000_MS: i64 = 253_402_300_800_000;
    const DAY_MS: i64 = 86_400_000;
    if !(0..YEAR_10000_MS).contains(&ms) {
        let at = DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
        out.extend_from_slice(at.to_rfc3339_opts(SecondsFormat::Millis, true).as_bytes());
        return;
    }
    let (year, month, day) = civil_from_days(ms / DAY_MS);
    let in_day = ms % DAY_MS;
    let mut text = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut value: i64| {
        for place in (at..at + width).rev() {
            text[place] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, in_day / 3_600_000);
    put(14, 2, in_day / 60_000 % 60);
    put(17, 2, in_day / 1_000 % 60);
    put(20, 3, in_day % 1_000);
    out.extend_from_slice(&text);
}

/// The proleptic Gregorian (year, month, day) of `days` since 1970-01-01, for
/// `days >= 0` (Howard Hinnant, "chrono-Compatible Low-Level Date Algorithms").
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// JSON body extractor that rejects unknown fields (via `deny_unknown_fields` on the
/// types), answers every failure with our error body, and never panics.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_json_media_type);
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send Content-Type: application/json",
            ));
        }
        // Read already, within the same limit, when the guard waited for the whole body.
        let bytes = match req.extensions().get::<crate::WholeBody>() {
            Some(crate::WholeBody(bytes)) => bytes.clone(),
            None => Bytes::from_request(req, state)
                .await
                .map_err(from_bytes_rejection)?,
        };
        // serde accepts a JSON array for a struct (fields by position); the contract's
        // bodies are objects only.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(not_an_object(&bytes, "the body must be a JSON object"));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| from_serde(e, &bytes))
    }
}

/// A body that is not a JSON object, told apart as [`from_serde`] tells them
/// ([`crate::error::is_json`]): JSON of another kind (an array, a string, a number) is
/// `invalid_body` with `message`; anything else (cut short, not UTF-8, not JSON at all)
/// is `malformed_json`.
fn not_an_object(bytes: &[u8], message: &'static str) -> ApiError {
    if crate::error::is_json(bytes) {
        ApiError::bad_request("invalid_body", message)
    } else {
        ApiError::bad_request("malformed_json", "the body is not JSON")
    }
}

/// `application/json`, with any parameters (`; charset=utf-8`), in any case (media
/// types are case-insensitive); not `application/jsonx`.
fn is_json_media_type(value: &str) -> bool {
    value
        .split(';')
        .next()
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// For the routes that take no body (pay, cancel): none, or an empty JSON object. A
/// field is unknown there as anywhere (400), rather than silently ignored.
pub struct NoBody;

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Empty {}
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(from_bytes_rejection)?;
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => Ok(NoBody),
            Some(b'{') => serde_json::from_slice::<Empty>(&bytes)
                .map(|_| NoBody)
                .map_err(|e| from_serde(e, &bytes)),
            Some(_) => Err(not_an_object(
                &bytes,
                "this route takes no body (or an empty JSON object)",
            )),
        }
    }
}

// ---- products ----------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProduct {
    pub sku: String,
    pub name: String,
    pub price_cents: i64,
    pub stock: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProductBody {
    pub sku: String,
    pub name: String,
    pub price_cents: i64,
    /// Units not carved into flash sales.
    pub available: u64,
}

impl From<ProductView> for ProductBody {
    fn from(p: ProductView) -> Self {
        Self {
            sku: p.sku.to_string(),
            name: p.name.to_string(),
            price_cents: p.price.get(),
            available: p.available,
        }
    }
}

#[utoipa::path(post, path = "/v1/products", request_body = CreateProduct, security(("admin" = [])),
    responses((status = 201, body = ProductBody), (status = 409, description = "sku_exists", body = ErrorBody),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn create_product(
    State(app): State<AppState>,
    _admin: Admin,
    JsonBody(body): JsonBody<CreateProduct>,
) -> Result<Response, ApiError> {
    let new = NewProduct {
        sku: Sku::parse(&body.sku)?,
        name: parse_name(&body.name)?,
        price: Cents::parse("price_cents", body.price_cents)?,
        stock: parse_stock("stock", body.stock)?,
    };
    let product = app.engine.create_product(new).await?;
    Ok((StatusCode::CREATED, Json(ProductBody::from(product))).into_response())
}

#[utoipa::path(get, path = "/v1/products/{sku}", params(("sku" = String, Path)),
    responses((status = 200, body = ProductBody), (status = 404, body = ErrorBody)))]
pub async fn get_product(
    State(app): State<AppState>,
    PathText(sku): PathText,
) -> Result<Json<ProductBody>, ApiError> {
    app.engine
        .product(&sku)
        .map(|p| Json(p.into()))
        .ok_or_else(|| ApiError::not_found("product_not_found", "no such product"))
}

// ---- flash sales -------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSale {
    pub sku: String,
    pub price_cents: i64,
    /// Carved out of the product's available stock.
    pub quantity: i64,
    #[serde(deserialize_with = "rfc3339_time")]
    pub starts_at: DateTime<Utc>,
    #[serde(deserialize_with = "rfc3339_time")]
    pub ends_at: DateTime<Utc>,
    pub per_user_limit: i64,
}

/// A time as the contract says, RFC 3339 (`2026-11-11T00:00:00Z`,
/// `2026-11-11T08:00:00+08:00`), not whatever chrono's lenient parser takes (`+0800`
/// offsets, five-digit years that no RFC 3339 reader reads back), and in UTC within
/// the years 0000–9999: the answers give times in UTC, and `9999-12-31T23:59:59-23:59`
/// would come back as a five-digit year.
fn rfc3339_time<'de, D: serde::Deserializer<'de>>(input: D) -> Result<DateTime<Utc>, D::Error> {
    use chrono::Datelike;
    let text = String::deserialize(input)?;
    let at = DateTime::parse_from_rfc3339(&text)
        .map(|at| at.with_timezone(&Utc))
        .map_err(|error| {
            serde::de::Error::custom(format!(
                "not an RFC 3339 time such as 2026-11-11T00:00:00Z or 2026-11-11T08:00:00+08:00 ({error})"
            ))
        })?;
    if !(0..=9_999).contains(&at.year()) {
        return Err(serde::de::Error::custom(format!(
            "{text} is in UTC outside the years an RFC 3339 time has (0000-9999)"
        )));
    }
    Ok(at)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SaleBody {
    pub id: String,
    pub sku: String,
    pub price_cents: i64,
    pub quantity: u64,
    pub remaining: u64,
    pub per_user_limit: u32,
    pub starts_at: String,
    pub ends_at: String,
    /// scheduled, live, sold_out or ended
    #[schema(value_type = String)]
    pub status: SaleStatus,
}

impl From<SaleView> for SaleBody {
    fn from(v: SaleView) -> Self {
        Self {
            id: v.record.id.to_string(),
            sku: v.record.sku.to_string(),
            price_cents: v.record.price.get(),
            quantity: v.record.quantity,
            remaining: v.remaining,
            per_user_limit: v.record.per_user_limit,
            starts_at: rfc3339(v.record.starts_at_ms),
            ends_at: rfc3339(v.record.ends_at_ms),
            status: v.status,
        }
    }
}

#[utoipa::path(post, path = "/v1/flash-sales", request_body = CreateSale, security(("admin" = [])),
    responses((status = 201, body = SaleBody), (status = 409, description = "insufficient_stock", body = ErrorBody),
              (status = 404, description = "product_not_found", body = ErrorBody), (status = 400, body = ErrorBody)))]
pub async fn create_sale(
    State(app): State<AppState>,
    _admin: Admin,
    JsonBody(body): JsonBody<CreateSale>,
) -> Result<Response, ApiError> {
    if !(1..=PER_USER_LIMIT_MAX).contains(&body.per_user_limit) {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("per_user_limit: must be within 1..={PER_USER_LIMIT_MAX}"),
        ));
    }
    let quantity = parse_stock("quantity", body.quantity)?;
    if quantity == 0 {
        return Err(ApiError::bad_request(
            "invalid_field",
            "quantity: must be at least 1",
        ));
    }
    let new = NewSale {
        sku: Sku::parse(&body.sku)?,
        price: Cents::parse("price_cents", body.price_cents)?,
        quantity,
        per_user_limit: body.per_user_limit as u32,
        starts_at_ms: body.starts_at.timestamp_millis(),
        ends_at_ms: body.ends_at.timestamp_millis(),
    };
    let sale = app.engine.create_sale(new).await?;
    Ok((StatusCode::CREATED, Json(SaleBody::from(sale))).into_response())
}

fn parse_sale_id(id: &str) -> Result<SaleId, ApiError> {
    SaleId::parse(id).ok_or_else(|| ApiError::not_found("sale_not_found", "no such flash sale"))
}

#[utoipa::path(get, path = "/v1/flash-sales/{id}", params(("id" = String, Path)),
    responses((status = 200, body = SaleBody), (status = 404, body = ErrorBody)))]
pub async fn get_sale(
    State(app): State<AppState>,
    PathText(id): PathText,
) -> Result<Json<SaleBody>, ApiError> {
    let id = parse_sale_id(&id)?;
    app.engine
        .sale(id)
        .map(|s| Json(s.into()))
        .ok_or_else(|| ApiError::not_found("sale_not_found", "no such flash sale"))
}

// ---- purchase (the hot path) -------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseRequest {
    /// 1..=1000 units.
    pub quantity: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PurchaseBody {
    pub order_id: String,
    pub sale_id: String,
    pub quantity: u32,
    pub amount_cents: i64,
    /// Always `pending_payment`: the state the order was created in.
    pub status: &'static str,
    pub expires_at: String,
}

impl From<&Placed> for PurchaseBody {
    fn from(p: &Placed) -> Self {
        Self {
            order_id: p.order_id.to_string(),
            sale_id: p.sale_id.to_string(),
            quantity: p.quantity.get(),
            amount_cents: p.amount.get(),
            status: OrderStatus::PendingPayment.as_str(),
            expires_at: rfc3339(p.expires_at_ms),
        }
    }
}

impl PurchaseBody {
    /// The bytes `serde_json` gives `PurchaseBody::from(placed)`, written into one buffer
    /// without building the struct: every value is a prefixed UUID, a number, a fixed
    /// word or an RFC 3339 time, none of which JSON escapes. The purchase is the hot
    /// answer, and going through serde (a `String` per field, every key and value scanned
    /// for escapes, axum's growing `BytesMut`) was ~7,500 instructions of a purchase's
    /// ~88,000 (BENCHMARKS.md, "The purchase's answer written directly"). The same bytes
    /// as serde's, for any input: `the_purchase_answer_is_what_serde_would_write`.
    pub fn json(placed: &Placed) -> Vec<u8> {
        // ~215 bytes with ids of 40 characters and a ten-digit amount: room for all at
        // once (192 grew the buffer at the time, ~250 instructions a purchase).
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"{\"order_id\":\"");
        out.extend_from_slice(placed.order_id.encode(&mut [0; ID_TEXT_MAX]).as_bytes());
        out.extend_from_slice(b"\",\"sale_id\":\"");
        out.extend_from_slice(placed.sale_id.encode(&mut [0; ID_TEXT_MAX]).as_bytes());
        out.extend_from_slice(b"\",\"quantity\":");
        out.extend_from_slice(itoa::Buffer::new().format(placed.quantity.get()).as_bytes());
        out.extend_from_slice(b",\"amount_cents\":");
        out.extend_from_slice(itoa::Buffer::new().format(placed.amount.get()).as_bytes());
        out.extend_from_slice(b",\"status\":\"");
        out.extend_from_slice(OrderStatus::PendingPayment.as_str().as_bytes());
        out.extend_from_slice(b"\",\"expires_at\":\"");
        push_rfc3339(&mut out, placed.expires_at_ms);
        out.extend_from_slice(b"\"}");
        out
    }
}

/// The request's `Idempotency-Key` header, if any: one value taken from the headers
/// instead of a copy of them all (axum's `HeaderMap` extractor clones the map). It never
/// refuses, so a request with a bad body and no key is still told about its body first.
/// `Err` when the header came more than once: which one is the key is not for the server
/// to guess (a retry sending only the other would place a second order).
pub struct KeyHeader(Result<Option<HeaderValue>, ()>);

impl<S: Send + Sync> FromRequestParts<S> for KeyHeader {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all("idempotency-key").iter();
        let first = values.next().cloned();
        Ok(Self(match values.next() {
            None => Ok(first),
            Some(_) => Err(()),
        }))
    }
}

/// [`purchase`] for a request that did not go through the router (`PurchaseFirst`, in
/// lib.rs): its extractors in the order axum runs them, each refusal answered as axum
/// answers it, then the handler. `id` is the path's sale id, spelled plainly.
pub(crate) async fn purchase_request(app: AppState, id: String, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let shopper = match Shopper::from_request_parts(&mut parts, &app).await {
        Ok(shopper) => shopper,
        Err(rejection) => return rejection.into_response(),
    };
    let Ok(key) = KeyHeader::from_request_parts(&mut parts, &app).await;
    let Ok(before) = BeforeQueue::from_request_parts(&mut parts, &app).await;
    let body = JsonBody::from_request(Request::from_parts(parts, body), &app).await;
    purchase(State(app), shopper, PathText(id), key, before, body)
        .await
        .into_response()
}

#[utoipa::path(post, path = "/v1/flash-sales/{id}/purchase", request_body = PurchaseRequest,
    params(("id" = String, Path), ("Idempotency-Key" = String, Header)), security(("shopper" = [])),
    responses((status = 201, description = "order placed and durable", body = PurchaseBody),
              (status = 200, description = "replay of an earlier request with the same key and body", body = PurchaseBody),
              (status = 409, description = "sold_out, limit_exceeded, not_started, ended", body = ErrorBody),
              (status = 422, description = "idempotency_key_reused", body = ErrorBody),
              (status = 400, description = "missing_idempotency_key, malformed_json, invalid_body, invalid_field", body = ErrorBody),
              (status = 401, body = ErrorBody),
              (status = 404, description = "sale_not_found", body = ErrorBody),
              (status = 429, description = "throttled, with Retry-After: a rule of the guard (the shipped one: a shopper's 10 purchases a second, burst 20)", body = ErrorBody),
              (status = 503, description = "overloaded, unavailable, circuit_open (the database breaker), degraded; all with Retry-After", body = ErrorBody)))]
pub async fn purchase(
    State(app): State<AppState>,
    Shopper(user): Shopper,
    PathText(id): PathText,
    KeyHeader(key): KeyHeader,
    BeforeQueue(before): BeforeQueue,
    body: Result<JsonBody<PurchaseRequest>, ApiError>,
) -> Result<Response, ApiError> {
    // The shopper's own limit before anything about the request is judged: a shopper's
    // attempts count against it whether or not they are well formed, so a flood of
    // malformed ones is refused per key (which gives the route's shared rate slot back,
    // `ApiError::per_key`) instead of using up the rate every shopper shares. A scalper's
    // 21st attempt in a second gets 429 without touching the engine. On a paced route
    // `protect` took them before the queue, and counts them ([`PurchaseKeys`]).
    let resource = &app.guarded.purchase;
    let before = before.filter(|keys| keys.user == user);
    let shopper_taken = match &before {
        Some(_) => None,
        None => Some(shopper_admits(&app, &user)?),
    };
    let shopper_passed = || {
        if let Some(taken) = shopper_taken {
            app.guard.hot_passed(resource, taken);
        }
    };
    let valid = purchase_input(key, body, &id);
    let (key, quantity, sale_id) = match valid {
        Ok(valid) => valid,
        Err(error) => {
            // An attempt all the same: it keeps the allowance it took.
            shopper_passed();
            return Err(error);
        }
    };
    if before.and_then(|keys| keys.sale) != Some(sale_id) {
        sale_admits(&app, &user, &sale_id, shopper_taken, true)?;
    }
    shopper_passed();
    let purchase = app.engine.purchase(user, key, sale_id, quantity).await?;
    let status = if purchase.replay {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        status,
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        PurchaseBody::json(&purchase.placed),
    )
        .into_response())
}

/// The shopper's own limit on a purchase by `user`, uncounted: the caller counts it as
/// passed, or gives it back, once the later limits have answered.
fn shopper_admits(app: &AppState, user: &UserId) -> Result<HotTaken, ApiError> {
    app.guard
        .check_hot_uncounted(
            &app.guarded.purchase,
            stampede_guard::Param::Shopper,
            user.as_str(),
        )
        .map_err(ApiError::per_key)
}

/// The sale's own limit on a purchase by `user`, checked after the shopper's
/// (`shopper_taken`, unless `protect` took it and answers for it): a refusal gives the
/// shopper's allowance back, and the shopper's rules do not count the request as
/// passed. `counted`: what it lets through it counts as passed at once (else the caller
/// does, [`stampede_guard::Guard::hot_passed`]).
fn sale_admits(
    app: &AppState,
    user: &UserId,
    sale_id: &SaleId,
    shopper_taken: Option<HotTaken>,
    counted: bool,
) -> Result<HotTaken, ApiError> {
    let resource = &app.guarded.purchase;
    let checked = if counted {
        app.guard
            .check_hot(resource, stampede_guard::Param::Sale, sale_id)
    } else {
        app.guard
            .check_hot_uncounted(resource, stampede_guard::Param::Sale, sale_id)
    };
    checked.map_err(|rejection| {
        if let Some(taken) = shopper_taken {
            app.guard.give_back_hot(resource, user.as_str(), taken);
        }
        ApiError::per_key(rejection)
    })
}

/// A purchase's per-key limits (the shopper's, and the sale's when the path spells its
/// id plainly) taken before a paced route's queue, by `protect`. There a request the
/// guard admits books a place in the queue that is its own until it is sent, so a
/// scalper's attempts past the shopper's limit, refused only after their wait, would
/// have held places the other shoppers' requests could have had: a thousand of them at
/// once would fill the queue and turn everyone else away. `protect` holds them until
/// the request is answered: counted as passed then, or given back if a later limit
/// refused it, it was answered 401, or it never was (its client gone in the wait). The
/// handler is told which it need not check ([`KeysChecked`]).
pub(crate) struct PurchaseKeys<'a> {
    app: &'a AppState,
    user: UserId,
    shopper: HotTaken,
    sale: Option<(SaleId, HotTaken)>,
    /// Handed to the handler, which may have placed the order: a request dropped from
    /// then on (its client gone while it waits for the commit) spent its allowance.
    handed_over: bool,
    done: bool,
}

impl<'a> PurchaseKeys<'a> {
    /// Takes the limits for `user`'s purchase in the sale spelled `sale_id`; a refusal
    /// is the handler's own (429 per key, `Retry-After`).
    pub(crate) fn take(
        app: &'a AppState,
        user: UserId,
        sale_id: Option<&str>,
    ) -> Result<Self, ApiError> {
        let shopper = shopper_admits(app, &user)?;
        let sale = match sale_id.and_then(SaleId::parse) {
            Some(sale_id) => Some((
                sale_id,
                sale_admits(app, &user, &sale_id, Some(shopper), false)?,
            )),
            None => None,
        };
        Ok(Self {
            app,
            user,
            shopper,
            sale,
            handed_over: false,
            done: false,
        })
    }

    /// What the handler need not check again.
    pub(crate) fn checked(&self) -> KeysChecked {
        KeysChecked {
            user: self.user.clone(),
            sale: self.sale.map(|(sale_id, _)| sale_id),
        }
    }

    /// The request goes on to the handler.
    pub(crate) fn hand_over(&mut self) {
        self.handed_over = true;
    }

    /// The request was answered: counted as passed by the rules that let it through,
    /// or, when `refused` (by a later limit, or 401), given back.
    pub(crate) fn answered(mut self, refused: bool) {
        if refused {
            self.give_back();
        } else {
            self.passed();
        }
        self.done = true;
    }

    fn passed(&self) {
        let (app, resource) = (self.app, &self.app.guarded.purchase);
        app.guard.hot_passed(resource, self.shopper);
        if let Some((_, taken)) = self.sale {
            app.guard.hot_passed(resource, taken);
        }
    }

    fn give_back(&self) {
        let (app, resource) = (self.app, &self.app.guarded.purchase);
        app.guard
            .give_back_hot(resource, self.user.as_str(), self.shopper);
        if let Some((sale_id, taken)) = &self.sale {
            app.guard.give_back_hot(resource, sale_id, *taken);
        }
    }
}

impl Drop for PurchaseKeys<'_> {
    /// Never answered. Refused by the route, or its client gone while it waited in the
    /// queue: it spends none of the shopper's or the sale's allowance. Its client gone
    /// once the handler had it: the order may be placed, so it spent them.
    fn drop(&mut self) {
        match (self.done, self.handed_over) {
            (true, _) => {}
            (false, true) => self.passed(),
            (false, false) => self.give_back(),
        }
    }
}

/// Which of a purchase's per-key limits `protect` took before the queue
/// ([`PurchaseKeys`]), for the handler ([`BeforeQueue`]).
#[derive(Clone, Debug)]
pub(crate) struct KeysChecked {
    user: UserId,
    sale: Option<SaleId>,
}

/// Extractor: the [`KeysChecked`] `protect` put in the request, if it did.
pub struct BeforeQueue(Option<KeysChecked>);

impl<S: Send + Sync> FromRequestParts<S> for BeforeQueue {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(parts.extensions.remove::<KeysChecked>()))
    }
}

/// A purchase's key, quantity and sale id, or the first thing wrong with them: the body
/// (as its extractor refused it), the key header, the quantity, then the sale id.
fn purchase_input(
    key: Result<Option<HeaderValue>, ()>,
    body: Result<JsonBody<PurchaseRequest>, ApiError>,
    id: &str,
) -> Result<(IdempotencyKey, Quantity, SaleId), ApiError> {
    let JsonBody(body) = body?;
    let key = key.map_err(|()| {
        ApiError::bad_request(
            "invalid_field",
            "idempotency_key: send one Idempotency-Key header, not several",
        )
    })?;
    // An empty header (HTTP trims the spaces around a value) is no key.
    let key = key.filter(|key| !key.is_empty()).ok_or_else(|| {
        ApiError::bad_request("missing_idempotency_key", "send an Idempotency-Key header")
    })?;
    let key = IdempotencyKey::parse(key.to_str().map_err(|_| {
        ApiError::bad_request("invalid_field", "idempotency_key: must be visible ASCII")
    })?)?;
    let quantity = Quantity::parse(body.quantity)?;
    let sale_id = parse_sale_id(id)?;
    Ok((key, quantity, sale_id))
}

// ---- orders --------------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
pub struct OrderBody {
    pub order_id: String,
    pub user_id: String,
    pub sale_id: String,
    pub sku: String,
    pub quantity: u32,
    pub amount_cents: i64,
    /// pending_payment, paid, cancelled or expired
    #[schema(value_type = String)]
    pub status: OrderStatus,
    pub created_at: String,
    pub expires_at: String,
}

impl From<OrderRecord> for OrderBody {
    fn from(o: OrderRecord) -> Self {
        Self {
            order_id: o.id.to_string(),
            user_id: o.user_id.to_string(),
            sale_id: o.sale_id.to_string(),
            sku: o.sku.to_string(),
            quantity: o.quantity.get(),
            amount_cents: o.amount.get(),
            status: o.status,
            created_at: rfc3339(o.created_at_ms),
            expires_at: rfc3339(o.expires_at_ms),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrderList {
    pub orders: Vec<OrderBody>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusBody {
    #[schema(value_type = String)]
    pub status: OrderStatus,
}

fn parse_order_id(id: &str) -> Result<OrderId, ApiError> {
    OrderId::parse(id).ok_or_else(|| ApiError::not_found("order_not_found", "no such order"))
}

#[utoipa::path(get, path = "/v1/orders/{id}", params(("id" = String, Path)), security(("shopper" = []), ("admin" = [])),
    responses((status = 200, body = OrderBody), (status = 401, body = ErrorBody), (status = 404, description = "also for another shopper's order", body = ErrorBody)))]
pub async fn get_order(
    State(app): State<AppState>,
    Caller(actor): Caller,
    PathText(id): PathText,
) -> Result<Json<OrderBody>, ApiError> {
    let id = parse_order_id(&id)?;
    Ok(Json(app.engine.order(&actor, id).await?.into()))
}

#[utoipa::path(get, path = "/v1/orders", security(("shopper" = [])),
    responses((status = 200, description = "the caller's newest 100 orders", body = OrderList), (status = 401, body = ErrorBody)))]
pub async fn list_orders(
    State(app): State<AppState>,
    Shopper(user): Shopper,
) -> Result<Json<OrderList>, ApiError> {
    let orders = app.engine.orders_of(&user, ORDER_LIST_LEN_MAX).await?;
    Ok(Json(OrderList {
        orders: orders.into_iter().map(Into::into).collect(),
    }))
}

#[utoipa::path(post, path = "/v1/orders/{id}/pay", params(("id" = String, Path)), security(("shopper" = [])),
    responses((status = 200, body = StatusBody),
              (status = 401, body = ErrorBody),
              (status = 404, description = "also for another shopper's order", body = ErrorBody),
              (status = 409, description = "order_expired, order_cancelled", body = ErrorBody),
              (status = 502, description = "payment_failed; the order stays payable", body = ErrorBody),
              (status = 429, description = "throttled: the payment resource's rule refused the call; nothing was charged", body = ErrorBody),
              (status = 503, description = "circuit_open, or overloaded/unavailable when the charge could not be noted in the store first (nothing was charged), or unavailable when the store could not record the order paid after the charge (the order stays payable, and paying again charges nothing more: the provider is called with the order's key)", body = ErrorBody),
              (status = 504, description = "payment_timeout; the order stays payable", body = ErrorBody)))]
pub async fn pay_order(
    State(app): State<AppState>,
    Shopper(user): Shopper,
    PathText(id): PathText,
    arrived: Option<axum::Extension<crate::Arrived>>,
    _: NoBody,
) -> Result<Json<StatusBody>, ApiError> {
    let id = parse_order_id(&id)?;
    let held = arrived.map_or(std::time::Duration::ZERO, |axum::Extension(at)| {
        at.0.elapsed()
    });
    let status = app
        .engine
        .pay_held(&user, id, app.payments.clone(), held)
        .await?;
    Ok(Json(StatusBody { status }))
}

#[utoipa::path(post, path = "/v1/orders/{id}/cancel", params(("id" = String, Path)), security(("shopper" = []), ("admin" = [])),
    responses((status = 200, body = StatusBody), (status = 401, body = ErrorBody), (status = 404, description = "also for another shopper's order", body = ErrorBody), (status = 409, description = "order_paid, order_expired", body = ErrorBody)))]
pub async fn cancel_order(
    State(app): State<AppState>,
    Caller(actor): Caller,
    PathText(id): PathText,
    _: NoBody,
) -> Result<Json<StatusBody>, ApiError> {
    let id = parse_order_id(&id)?;
    let status = app.engine.cancel(&actor, id).await?;
    Ok(Json(StatusBody { status }))
}

// ---- audit ---------------------------------------------------------------------------

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditBody {
    pub quantity: u64,
    pub remaining: u64,
    pub pending_payment: u64,
    pub paid: u64,
    pub cancelled: u64,
    pub expired: u64,
    /// Units reserved whose orders are still being committed (0 when idle).
    pub in_flight: u64,
    pub users_over_limit: u64,
    /// quantity == remaining + pending_payment + paid, and nobody over the limit.
    pub consistent: bool,
}

#[utoipa::path(get, path = "/v1/flash-sales/{id}/audit", params(("id" = String, Path)), security(("admin" = [])),
    responses((status = 200, body = AuditBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn audit_sale(
    State(app): State<AppState>,
    _admin: Admin,
    PathText(id): PathText,
) -> Result<Json<AuditBody>, ApiError> {
    let id = parse_sale_id(&id)?;
    let audit = app
        .engine
        .audit(id)
        .await?
        .ok_or_else(|| ApiError::not_found("sale_not_found", "no such flash sale"))?;
    Ok(Json(AuditBody {
        quantity: audit.quantity,
        remaining: audit.remaining,
        pending_payment: audit.tally.pending_payment,
        paid: audit.tally.paid,
        cancelled: audit.tally.cancelled,
        expired: audit.tally.expired,
        in_flight: audit.in_flight,
        users_over_limit: audit.tally.users_over_limit,
        consistent: audit.consistent,
    }))
}

// ---- operations ------------------------------------------------------------------------

#[utoipa::path(get, path = "/healthz",
    responses((status = 200, description = "the process answers"),
              (status = 503, description = "the writer halted (fenced off, or a commit's outcome was lost): restart the node", body = ErrorBody)))]
pub async fn healthz(State(app): State<AppState>) -> Result<&'static str, ApiError> {
    // Liveness: only a halted writer fails it, because only a restart cures that. A
    // database outage fails /readyz instead, so the node is not restarted for it.
    if app.engine.halted() {
        Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "halted",
            "the writer halted; restart this node to rebuild its state from the store",
        ))
    } else {
        Ok("ok")
    }
}

#[utoipa::path(get, path = "/readyz",
    responses((status = 200, description = "writer running and store reachable"), (status = 503, body = ErrorBody)))]
pub async fn readyz(State(app): State<AppState>) -> Result<&'static str, ApiError> {
    if app.engine.ready().await {
        Ok("ready")
    } else {
        Err(ApiError::unavailable("not ready"))
    }
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
pub async fn metrics(State(app): State<AppState>) -> Response {
    metrics::gauge!("stampede_writer_queue_depth").set(app.engine.queue_depth() as f64);
    app.guard.export_metrics();
    metrics::gauge!("stampede_writer_queue_capacity").set(app.engine.queue_capacity() as f64);
    // Process memory, threads and descriptors (`process_*`), CPU time to the microsecond
    // (`process_cpu_seconds_total` is in whole seconds) and the cores the machine has,
    // so a load generator can tell when the server ran out of CPU.
    static PROCESS: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    PROCESS
        .get_or_init(|| {
            let collector = metrics_process::Collector::default();
            collector.describe();
            collector
        })
        .collect();
    metrics::gauge!("stampede_cpu_seconds_total")
        .set(cpu_time::ProcessTime::now().as_duration().as_secs_f64());
    metrics::gauge!("stampede_cpu_cores")
        .set(std::thread::available_parallelism().map_or(1, |n| n.get()) as f64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.metrics.render(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "this document, OpenAPI 3.1, generated from the code")))]
pub async fn openapi(State(app): State<AppState>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        app.openapi.to_string(),
    )
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route")
}

// ---- guard -----------------------------------------------------------------------------

/// The key the guard's rules are kept under in the store.
pub const GUARD_RULES_KEY: &str = "guard_rules";

/// Which versions a change may carry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NextVersion {
    /// Exactly the current + 1: the admin API's compare-and-swap, so two admins cannot
    /// overwrite each other's change unseen.
    Exact,
    /// Any higher one: a configuration file states the version it was written as.
    Newer,
    /// The current + 1, made on whatever rules are in force: a degradation switch,
    /// which names no version, is made on rules another node changed too.
    OnCurrent,
}

/// 409 `version_conflict`, saying why.
fn version_conflict(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "version_conflict", message)
}

/// Validates, persists, then swaps in new rules (in that order, one change at a time):
/// rules that answer 200 survive a restart.
async fn change_rules(
    app: &AppState,
    next: NextVersion,
    change: impl FnOnce(&mut stampede_guard::GuardRules),
) -> Result<stampede_guard::GuardRules, ApiError> {
    let _one = app.rules_change.lock().await;
    // The stored copy first: nodes sharing a database change the rules through it. One
    // newer than those in force here (another node's change this node has not followed
    // yet, or one of this node's that landed after its request timed out) is taken up;
    // a change written against the older rules is then refused. Nothing is saved over
    // a newer copy this node cannot take up.
    let store = app.engine.store();
    let stored = bounded(app, store.load_setting(GUARD_RULES_KEY), "read").await?;
    match take_up_newer(app, stored.as_deref()) {
        Ok(None) => {}
        // A switch, or a file's rules (whose version says whether they are newer still),
        // is made on them.
        Ok(Some(_)) if next != NextVersion::Exact => {}
        Ok(Some(version)) => {
            return Err(version_conflict(format!(
                "the stored rules were newer than those in force here (another node's \
                 change, or one of this node's that landed after its request timed out): \
                 version {version} is in force now; send your change against it"
            )));
        }
        Err(refused) => return Err(version_conflict(refused)),
    }
    let mut rules = app.guard.rules();
    let current = rules.version;
    change(&mut rules);
    if next == NextVersion::Newer && rules.version > stampede_guard::rules::FILE_VERSION_MAX {
        return Err(ApiError::bad_request(
            "invalid_rules",
            format!(
                "version: a file's version must be at most {}, leaving room for the changes after it",
                stampede_guard::rules::FILE_VERSION_MAX
            ),
        ));
    }
    let fits = match next {
        NextVersion::Exact | NextVersion::OnCurrent => rules.version == current + 1,
        NextVersion::Newer => rules.version > current,
    };
    if !fits {
        return Err(version_conflict(match next {
            NextVersion::Newer => format!("version must be above {current}, the current version"),
            _ => format!(
                "version must be {} (the current version is {current})",
                current + 1
            ),
        }));
    }
    check_in_force_here(app, &rules)?;
    let json = serde_json::to_string(&rules).expect("rules serialise");
    // Only over the copy read above: another node's change saved in between is not
    // overwritten unseen (it is taken up by the next look, `follow_stored_rules`).
    let saved = bounded(
        app,
        store.save_setting_if(GUARD_RULES_KEY, &json, stored.as_deref()),
        "saved",
    )
    .await?;
    if !saved {
        return Err(version_conflict(
            "the rules were changed on another node meanwhile: read them and send your \
             change again",
        ));
    }
    take_up(app, rules.clone())?;
    tracing::info!(
        version = rules.version,
        dry_run = rules.dry_run,
        "guard rules changed"
    );
    Ok(rules)
}

/// `work` on the store, within `database_timeout`: a stalled database answers 503 and
/// the rules stay as they were, rather than hold the admin's request until the
/// connection is cut. `what` the rules could not be (read, saved).
async fn bounded<T>(
    app: &AppState,
    work: impl std::future::Future<Output = Result<T, stampede_engine::StoreError>>,
    what: &str,
) -> Result<T, ApiError> {
    let done = if app.database_timeout.is_zero() {
        work.await
    } else {
        tokio::time::timeout(app.database_timeout, work)
            .await
            .map_err(|_| {
                ApiError::unavailable(format!(
                    "the rules could not be {what} within database_timeout ({:?}): the rules \
                     in force are unchanged, but a save may still land when the database \
                     answers (every node then takes it up), so read them before sending the \
                     change again",
                    app.database_timeout
                ))
            })?
    };
    done.map_err(|e| ApiError::unavailable(format!("the rules could not be {what}: {e}")))
}

/// Whether `rules` can be in force on this server: valid, within the guard's room, and
/// with no answer the server may take longer than its `client_timeout`.
fn check_in_force_here(app: &AppState, rules: &stampede_guard::GuardRules) -> Result<(), ApiError> {
    crate::check_rules(rules).map_err(rule_errors)?;
    app.guard.check_room(rules).map_err(rule_errors)?;
    let longest = crate::longest_answer(rules, app.payment_timeout);
    if longest > app.client_timeout {
        return Err(ApiError::bad_request(
            "invalid_rules",
            format!(
                "these pacing waits and system.hold_refused make the longest answer \
                 {longest:?}, beyond the server's client_timeout of {:?}: shorten max_queue \
                 or hold_refused, or raise client_timeout",
                app.client_timeout
            ),
        ));
    }
    Ok(())
}

/// Puts `rules` in force here (already kept in the store).
fn take_up(app: &AppState, rules: stampede_guard::GuardRules) -> Result<(), ApiError> {
    let limit = crate::pay_held_max(&rules);
    app.guard.replace(rules).map_err(rule_errors)?;
    app.engine.set_payment_wait_max(limit);
    Ok(())
}

/// Takes up the stored rules `json` if they are newer than those in force here, and
/// answers their version; or why they cannot be in force here (nor saved over): newer
/// rules this server cannot run, or a copy it cannot read (another release's).
fn take_up_newer(app: &AppState, json: Option<&str>) -> Result<Option<u64>, String> {
    let Some(json) = json else {
        return Ok(None);
    };
    let rules = serde_json::from_str::<stampede_guard::GuardRules>(json).map_err(|error| {
        format!(
            "the stored rules cannot be read by this release ({error}): another release \
             keeps them; change them through a node that runs it"
        )
    })?;
    let version = rules.version;
    if version <= app.guard.rules().version {
        return Ok(None);
    }
    check_in_force_here(app, &rules)
        .and_then(|()| take_up(app, rules))
        .map(|()| Some(version))
        .map_err(|error| {
            format!(
                "the stored rules, version {version}, are newer than those in force here \
                 but cannot be in force on this node ({}): change them through a node that \
                 runs them, or this node's settings",
                error.message
            )
        })
}

/// How often a server looks at the stored rules for a change another node made.
pub const RULES_FOLLOWED_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes up the stored rules if another node (sharing this database) made them newer
/// than those in force here: a change through any node's admin API or file reaches every
/// node within [`RULES_FOLLOWED_EVERY`]. The version taken up, if any.
pub async fn follow_stored_rules(app: &AppState) -> Result<Option<u64>, ApiError> {
    let _one = app.rules_change.lock().await;
    let stored = bounded(
        app,
        app.engine.store().load_setting(GUARD_RULES_KEY),
        "read",
    )
    .await?;
    let taken = take_up_newer(app, stored.as_deref()).map_err(version_conflict)?;
    if let Some(version) = taken {
        tracing::info!(version, "guard rules changed on another node taken up");
    }
    Ok(taken)
}

/// Most rule problems one answer lists: a body of thousands of bad rules gets the first
/// ones and a count, not a message of megabytes.
const RULE_ERRORS_LISTED_MAX: usize = 32;

fn rule_errors(errors: Vec<stampede_guard::RuleError>) -> ApiError {
    let mut message = errors
        .iter()
        .take(RULE_ERRORS_LISTED_MAX)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if errors.len() > RULE_ERRORS_LISTED_MAX {
        message.push_str(&format!(
            "; and {} more",
            errors.len() - RULE_ERRORS_LISTED_MAX
        ));
    }
    ApiError::bad_request("invalid_rules", message)
}

/// Replaces the rules with `rules` (which must carry the current version + 1): validated,
/// kept in the store, then live. Used by `PUT /v1/guard/rules`.
pub async fn apply_rules(
    app: &AppState,
    rules: stampede_guard::GuardRules,
) -> Result<stampede_guard::GuardRules, ApiError> {
    change_rules(app, NextVersion::Exact, move |current| *current = rules).await
}

/// Replaces the rules with those of a configuration file, which may carry any newer
/// version: validated, kept in the store, then live, as an API change.
pub async fn reload_rules(
    app: &AppState,
    rules: stampede_guard::GuardRules,
) -> Result<stampede_guard::GuardRules, ApiError> {
    change_rules(app, NextVersion::Newer, move |current| *current = rules).await
}

#[utoipa::path(get, path = "/v1/guard/rules", security(("admin" = [])),
    responses((status = 200, description = "the guard's rules and their version"), (status = 401, body = ErrorBody)))]
pub async fn get_guard_rules(State(app): State<AppState>, _admin: Admin) -> Response {
    Json(app.guard.rules()).into_response()
}

#[utoipa::path(put, path = "/v1/guard/rules", security(("admin" = [])),
    request_body(content = Object, content_type = "application/json",
                 description = "the whole rules document as GET answers it, with version = the current version + 1"),
    responses((status = 200, description = "rules replaced, persisted and live"),
              (status = 400, description = "invalid_rules: every problem, each naming its field; invalid_body: not a rules document", body = ErrorBody),
              (status = 409, description = "version_conflict: send the current version + 1 (also when another node sharing the database changed them first, or their newer stored copy cannot be in force here)", body = ErrorBody),
              (status = 503, description = "unavailable: the store did not keep the rules within database_timeout; the rules in force are unchanged, but the save may still land, and every node then takes it up", body = ErrorBody)))]
pub async fn put_guard_rules(
    State(app): State<AppState>,
    _admin: Admin,
    JsonBody(rules): JsonBody<stampede_guard::GuardRules>,
) -> Result<Response, ApiError> {
    let rules = apply_rules(&app, rules).await?;
    Ok(Json(rules).into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DegradeRequest {
    /// pay, purchase, browse or stats
    #[schema(value_type = String)]
    pub class: stampede_guard::Class,
    /// true switches the class off (503 `degraded`), false back on.
    pub off: bool,
}

#[utoipa::path(post, path = "/v1/guard/degrade", request_body = DegradeRequest, security(("admin" = [])),
    responses((status = 200, description = "the new rules (a new version)"), (status = 401, body = ErrorBody),
              (status = 409, description = "version_conflict: the stored rules are newer than this node's and cannot be in force here", body = ErrorBody),
              (status = 503, description = "unavailable: the store did not keep the change within database_timeout; the rules in force are unchanged, but the save may still land, and every node then takes it up", body = ErrorBody)))]
pub async fn degrade(
    State(app): State<AppState>,
    _admin: Admin,
    JsonBody(body): JsonBody<DegradeRequest>,
) -> Result<Response, ApiError> {
    let rules = change_rules(&app, NextVersion::OnCurrent, move |rules| {
        rules.version += 1;
        rules.degraded.retain(|c| *c != body.class);
        if body.off {
            rules.degraded.push(body.class);
        }
    })
    .await?;
    Ok(Json(rules).into_response())
}

#[utoipa::path(get, path = "/v1/guard/stats",
    responses((status = 200, description = "per resource: the last second (passed, blocked by reason, errors, mean RT) and totals")))]
pub async fn guard_stats(State(app): State<AppState>) -> Response {
    Json(app.guard.stats()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_recognised_in_any_case_with_parameters_only() {
        assert!(is_json_media_type("application/json"));
        assert!(is_json_media_type("Application/JSON; charset=utf-8"));
        assert!(!is_json_media_type("application/jsonfoo"));
        assert!(!is_json_media_type("text/json"));
    }

    #[test]
    fn the_purchase_answer_fits_the_room_it_starts_with() {
        let placed = Placed {
            order_id: OrderId(uuid::Uuid::from_u128(u128::MAX)),
            sale_id: SaleId(uuid::Uuid::from_u128(u128::MAX)),
            quantity: Quantity::parse(i64::from(stampede_types::PURCHASE_QUANTITY_MAX)).unwrap(),
            amount: Cents::parse_amount(
                "amount_cents",
                stampede_types::PRICE_CENTS_MAX * i64::from(stampede_types::PURCHASE_QUANTITY_MAX),
            )
            .unwrap(),
            expires_at_ms: 253_402_300_799_999,
        };
        let json = PurchaseBody::json(&placed);
        assert!(json.len() <= 256, "{} bytes", json.len());
        assert_eq!(json.capacity(), 256, "the buffer grew");
    }

    #[test]
    fn rfc3339_is_chronos_at_the_edges() {
        let chrono = |ms: i64| {
            DateTime::<Utc>::from_timestamp_millis(ms)
                .unwrap_or_default()
                .to_rfc3339_opts(SecondsFormat::Millis, true)
        };
        for ms in [
            i64::MIN,
            -1,
            0,
            951_782_400_000,   // 2000-02-29, a leap day of a century divisible by 400
            4_107_542_400_000, // 2100-03-01, after a century that is not a leap year
            1_798_761_599_999, // 2026-12-31T23:59:59.999
            253_402_300_799_999, // the last millisecond of 9999
            253_402_300_800_000, // 10000-01-01, where chrono's sign and fifth digit start
            i64::MAX,
        ] {
            assert_eq!(rfc3339(ms), chrono(ms), "{ms}");
        }
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn rfc3339_is_chronos_for_any_time(ms in prop_oneof![
            // Times a sale gives (1970 to 2200), and any i64 besides.
            0i64..7_258_118_400_000,
            any::<i64>(),
        ]) {
            prop_assert_eq!(
                rfc3339(ms),
                DateTime::<Utc>::from_timestamp_millis(ms)
                    .unwrap_or_default()
                    .to_rfc3339_opts(SecondsFormat::Millis, true)
            );
        }

        #[test]
        fn the_purchase_answer_is_what_serde_would_write(
            order in any::<u128>(),
            sale in any::<u128>(),
            quantity in 1i64..=i64::from(stampede_types::PURCHASE_QUANTITY_MAX),
            amount in 0i64..=stampede_types::PRICE_CENTS_MAX
                * i64::from(stampede_types::PURCHASE_QUANTITY_MAX),
            expires_at_ms in prop_oneof![
                // Times a sale gives (1970 to 2200), and any i64 besides.
                0i64..7_258_118_400_000,
                any::<i64>(),
            ],
        ) {
            let placed = Placed {
                order_id: OrderId(uuid::Uuid::from_u128(order)),
                sale_id: SaleId(uuid::Uuid::from_u128(sale)),
                quantity: Quantity::parse(quantity).unwrap(),
                amount: Cents::parse_amount("amount_cents", amount).unwrap(),
                expires_at_ms,
            };
            let by_serde = serde_json::to_vec(&PurchaseBody::from(&placed)).unwrap();
            prop_assert_eq!(
                String::from_utf8(PurchaseBody::json(&placed)).unwrap(),
                String::from_utf8(by_serde).unwrap()
            );
        }
    }
}
