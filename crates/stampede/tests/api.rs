//! Contract tests of API v1 (see the brief, "API contract v1"), black box over HTTP.
//! Every test starts its own server on a fresh data directory and its own payment
//! simulator process, and runs once per store: SQLite, PostgreSQL and MariaDB
//! (`name::sqlite`, `name::postgres`, `name::mysql`), each on a fresh database.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use stampede_store::on_every_backend;
use stampede_store::testing::Backend;

on_every_backend!(
    products_create_get_duplicate_unknown_and_admin_only,
    flash_sale_carves_stock_out_of_the_product,
    flash_sale_status_and_purchases_outside_the_window,
    purchase_answers_201_with_the_contract_fields,
    idempotency_replays_refuses_reuse_and_requires_a_key,
    per_user_limit_is_enforced,
    sold_out_when_the_stock_is_gone,
    bad_purchase_bodies_are_refused_and_change_nothing,
    request_bodies_must_be_json_objects,
    oversized_body_is_413_and_changes_nothing,
    bad_tokens_are_401_and_change_nothing,
    other_shoppers_orders_are_404,
    orders_are_visible_to_owner_and_admin_and_listed_per_shopper,
    cancel_returns_stock_and_a_paid_order_cannot_be_cancelled,
    pay_marks_paid_and_charges_once,
    payment_failure_is_502_and_the_order_stays_payable,
    payment_timeout_is_504_and_the_order_stays_payable,
    pay_racing_a_cancel_decides_one_winner_and_refunds,
    an_unpaid_order_expires_and_its_stock_returns,
    pay_started_just_before_the_deadline_wins_over_expiry,
    a_cached_token_stops_working_when_it_expires,
    expiry_survives_a_graceful_restart,
    audit_adds_up_after_a_mix_of_purchases_payments_and_cancels,
    operations_endpoints_answer,
    graceful_restart_keeps_everything,
    a_second_server_on_the_same_data_directory_is_refused,
    the_largest_orders_survive_a_restart,
    a_charge_that_lands_after_a_timeout_is_refunded_when_the_order_is_cancelled,
    a_declined_payment_is_not_refunded,
);

/// What must not change when a request is refused: the sale as the public sees it, the
/// books, and the shopper's orders.
async fn snapshot(app: &TestApp, sale_id: &str, token: &str) -> (Value, Value, Vec<Value>) {
    (
        app.sale(sale_id).await,
        app.audit(sale_id).await,
        app.orders(token).await,
    )
}

// ---- products ------------------------------------------------------------------------------

async fn products_create_get_duplicate_unknown_and_admin_only(backend: Backend) {
    let app = spawn_app_on(backend).await;

    let reply = app.post_product("PHONE-1", 50).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(reply.body["sku"], "PHONE-1");
    assert_eq!(reply.body["name"], "Product PHONE-1");
    assert_eq!(reply.body["price_cents"], 1_999);
    assert_eq!(reply.body["available"], 50);

    let reply = app.get("/v1/products/PHONE-1", None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.body,
        json!({"sku": "PHONE-1", "name": "Product PHONE-1", "price_cents": 1_999, "available": 50})
    );

    let reply = app.post_product("PHONE-1", 7).await;
    assert_error(&reply, 409, "sku_exists");
    assert_eq!(
        app.product("PHONE-1").await["available"],
        50,
        "a refused duplicate changes nothing"
    );

    let reply = app.get("/v1/products/NO-SUCH-SKU", None).await;
    assert_eq!(reply.status, 404);
    assert_error_shape(&reply.body);

    // Only the admin creates products.
    let body = json!({"sku": "PHONE-2", "name": "x", "price_cents": 1, "stock": 1});
    let shopper = app.shopper("alice");
    for token in [None, Some(shopper.as_str()), Some("not-the-admin-token")] {
        let reply = app.post_json("/v1/products", token, &body).await;
        assert_eq!(reply.status, 401, "{}", reply.body);
        assert_error_shape(&reply.body);
    }
    assert_eq!(
        app.get("/v1/products/PHONE-2", None).await.status,
        404,
        "nothing was created"
    );

    // Invalid fields and unknown fields.
    let reply = app
        .post_json(
            "/v1/products",
            Some(&app.admin),
            &json!({"sku": "P-3", "name": "x", "price_cents": -1, "stock": 1}),
        )
        .await;
    assert_error(&reply, 400, "invalid_field");
    let reply = app
        .post_json(
            "/v1/products",
            Some(&app.admin),
            &json!({"sku": "P-3", "name": "x", "price_cents": 1, "stock": 1, "colour": "red"}),
        )
        .await;
    assert_error(&reply, 400, "invalid_body");
    assert_eq!(app.get("/v1/products/P-3", None).await.status, 404);
}

// ---- flash sales ---------------------------------------------------------------------------

async fn flash_sale_carves_stock_out_of_the_product(backend: Backend) {
    let app = spawn_app_on(backend).await;
    app.create_product("TV-1", 100).await;

    let starts_at = rfc3339_in(chrono::Duration::seconds(-1));
    let ends_at = rfc3339_in(chrono::Duration::hours(1));
    let reply = app
        .post_sale(&json!({
            "sku": "TV-1", "price_cents": 500, "quantity": 60, "per_user_limit": 2,
            "starts_at": starts_at, "ends_at": ends_at,
        }))
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let sale = reply.body;
    let id = sale["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("sale_"), "{sale}");
    assert_eq!(sale["sku"], "TV-1");
    assert_eq!(sale["price_cents"], 500);
    assert_eq!(sale["quantity"], 60);
    assert_eq!(sale["remaining"], 60);
    assert_eq!(sale["per_user_limit"], 2);
    assert_eq!(sale["status"], "live");
    assert!(
        sale["starts_at"].is_string() && sale["ends_at"].is_string(),
        "{sale}"
    );

    assert_eq!(
        app.product("TV-1").await["available"],
        40,
        "the sale's quantity is carved out"
    );
    assert_eq!(app.sale(&id).await, sale, "GET answers what POST answered");

    // More than is left: refused, nothing carved.
    let reply = app
        .post_sale(&json!({
            "sku": "TV-1", "price_cents": 500, "quantity": 41, "per_user_limit": 1,
            "starts_at": starts_at, "ends_at": ends_at,
        }))
        .await;
    assert_error(&reply, 409, "insufficient_stock");
    assert_eq!(app.product("TV-1").await["available"], 40);

    // Exactly what is left is fine.
    app.create_sale("TV-1", 40, 1).await;
    assert_eq!(app.product("TV-1").await["available"], 0);

    // Unknown product, admin only, bad windows.
    let reply = app
        .post_sale(&json!({
            "sku": "NOPE", "price_cents": 500, "quantity": 1, "per_user_limit": 1,
            "starts_at": starts_at, "ends_at": ends_at,
        }))
        .await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert_error_shape(&reply.body);
    let shopper = app.shopper("bob");
    let reply = app
        .post_json(
            "/v1/flash-sales",
            Some(&shopper),
            &json!({"sku": "TV-1", "price_cents": 1, "quantity": 1, "per_user_limit": 1, "starts_at": starts_at, "ends_at": ends_at}),
        )
        .await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    app.create_product("TV-2", 10).await;
    let reply = app
        .post_sale(&json!({
            "sku": "TV-2", "price_cents": 500, "quantity": 1, "per_user_limit": 1,
            "starts_at": ends_at, "ends_at": starts_at,
        }))
        .await;
    assert_error(&reply, 400, "invalid_field");
    for (quantity, per_user_limit) in [(0, 1), (-5, 1), (1, 0), (1, 1_001)] {
        let reply = app
            .post_sale(&json!({
                "sku": "TV-2", "price_cents": 500, "quantity": quantity, "per_user_limit": per_user_limit,
                "starts_at": starts_at, "ends_at": ends_at,
            }))
            .await;
        assert_error(&reply, 400, "invalid_field");
    }
    // A sale that ended before it was made (a typo'd year) would take the stock for good.
    let reply = app
        .post_sale(&json!({
            "sku": "TV-2", "price_cents": 500, "quantity": 5, "per_user_limit": 1,
            "starts_at": "2020-01-01T00:00:00Z", "ends_at": "2020-01-02T00:00:00Z",
        }))
        .await;
    assert_error(&reply, 400, "invalid_field");
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ends_at"),
        "{}",
        reply.body
    );
    assert_eq!(app.product("TV-2").await["available"], 10);
    // Times as the contract says, RFC 3339: a `+0800` offset or a five-digit year (which
    // no RFC 3339 reader reads back) is refused, and so is a time whose offset moves it
    // out of the years 0000-9999 in UTC, the form every answer gives.
    for (starts, ends) in [
        ("2030-01-01T00:00:00+0800", "2030-01-02T00:00:00+08:00"),
        ("2030-01-01T00:00:00Z", "+10000-01-01T00:00:00Z"),
        ("2030-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59"),
        ("0000-01-01T00:00:00+01:00", "2030-01-02T00:00:00Z"),
        ("2030-01-01", "2030-01-02T00:00:00Z"),
    ] {
        let reply = app
            .post_sale(&json!({
                "sku": "TV-2", "price_cents": 500, "quantity": 5, "per_user_limit": 1,
                "starts_at": starts, "ends_at": ends,
            }))
            .await;
        assert_error(&reply, 400, "invalid_body");
        assert!(
            reply.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("RFC 3339"),
            "{starts} {ends}: {}",
            reply.body
        );
    }
    assert_eq!(app.product("TV-2").await["available"], 10);

    // Unknown and garbage sale ids.
    let reply = app
        .get(
            "/v1/flash-sales/sale_0190a0b0c0d07e0f8a9b0c1d2e3f4a5b",
            None,
        )
        .await;
    assert_eq!(reply.status, 404);
    assert_error_shape(&reply.body);
    let reply = app.get("/v1/flash-sales/garbage", None).await;
    assert_eq!(reply.status, 404);
    assert_error_shape(&reply.body);
}

async fn flash_sale_status_and_purchases_outside_the_window(backend: Backend) {
    let app = spawn_app_on(backend).await;
    app.create_product("CAM-1", 30).await;
    let hour = chrono::Duration::hours(1);
    let scheduled = app
        .create_sale_between("CAM-1", 10, 1, hour, hour * 2)
        .await;
    let live = app
        .create_sale_between("CAM-1", 1, 1, chrono::Duration::seconds(-1), hour)
        .await;
    // A sale cannot be made already ended (its stock would be taken for good): this one
    // ends a moment after it is made.
    let ended = app
        .create_sale_between("CAM-1", 10, 1, -hour, chrono::Duration::milliseconds(1_500))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(1_600)).await;

    assert_eq!(app.sale(&scheduled).await["status"], "scheduled");
    assert_eq!(app.sale(&live).await["status"], "live");
    assert_eq!(app.sale(&ended).await["status"], "ended");

    let token = app.shopper("carol");
    let reply = app
        .purchase_reply(&token, &scheduled, "k-scheduled", 1)
        .await;
    assert_error(&reply, 409, "not_started");
    let reply = app.purchase_reply(&token, &ended, "k-ended", 1).await;
    assert_error(&reply, 409, "ended");
    assert_eq!(app.remaining(&scheduled).await, 10);
    assert_eq!(app.remaining(&ended).await, 10);
    assert!(app.orders(&token).await.is_empty());

    app.buy(&token, &live, "k-live", 1).await;
    let sale = app.sale(&live).await;
    assert_eq!(sale["remaining"], 0);
    assert_eq!(sale["status"], "sold_out");

    // A purchase on a sale that does not exist.
    let reply = app
        .purchase_reply(&token, "sale_0190a0b0c0d07e0f8a9b0c1d2e3f4a5b", "k-none", 1)
        .await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert_error_shape(&reply.body);
}

// ---- purchase ------------------------------------------------------------------------------

async fn purchase_answers_201_with_the_contract_fields(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("SHOE-1", 10, 3).await;
    let token = app.shopper("dave");

    let before = chrono::Utc::now();
    let (status, body) = app.purchase(&token, &sale, "dave-1", 2).await;
    assert_eq!(status, 201, "{body}");
    let fields: Vec<&str> = body
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    for field in [
        "order_id",
        "sale_id",
        "quantity",
        "amount_cents",
        "status",
        "expires_at",
    ] {
        assert!(fields.contains(&field), "missing {field}: {body}");
    }
    assert!(
        body["order_id"]
            .as_str()
            .expect("order_id")
            .starts_with("ord_"),
        "{body}"
    );
    assert_eq!(body["sale_id"], sale.as_str());
    assert_eq!(body["quantity"], 2);
    assert_eq!(body["amount_cents"], 2 * 999);
    assert_eq!(body["status"], "pending_payment");
    let expires_at =
        chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().expect("expires_at"))
            .expect("expires_at is RFC 3339");
    let window = expires_at.with_timezone(&chrono::Utc) - before;
    assert!(
        window > chrono::Duration::minutes(14) && window <= chrono::Duration::minutes(16),
        "default payment window is 15 minutes: {body}"
    );

    assert_eq!(app.remaining(&sale).await, 8);
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["pending_payment"], 2);
}

async fn idempotency_replays_refuses_reuse_and_requires_a_key(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("BAG-1", 10, 5).await;
    let token = app.shopper("erin");

    let reply = app.purchase_reply(&token, &sale, "erin-key-1", 2).await;
    let (status, first) = (reply.status, reply.body);
    assert_eq!(status, 201, "{first}");
    // The answer is written without serde (`PurchaseBody::json`): still JSON, labelled so.
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(first["quantity"], 2);
    assert_eq!(first["status"], "pending_payment");
    assert!(first["order_id"].as_str().unwrap().starts_with("ord_"));
    assert_eq!(first["sale_id"], sale.as_str());

    for _ in 0..3 {
        let (status, again) = app.purchase(&token, &sale, "erin-key-1", 2).await;
        assert_eq!(status, 200, "a replay answers 200: {again}");
        assert_eq!(again, first, "a replay answers the identical body");
    }
    assert_eq!(app.remaining(&sale).await, 8, "replays take no stock");
    assert_eq!(app.orders(&token).await.len(), 1, "replays create no order");

    // Same key, other body.
    let reply = app.purchase_reply(&token, &sale, "erin-key-1", 3).await;
    assert_error(&reply, 422, "idempotency_key_reused");
    let other_sale = app.live_sale("BAG-2", 10, 5).await;
    let reply = app
        .purchase_reply(&token, &other_sale, "erin-key-1", 2)
        .await;
    assert_error(&reply, 422, "idempotency_key_reused");
    assert_eq!(app.remaining(&other_sale).await, 10);

    // Keys belong to one shopper: another shopper's identical key is a new purchase.
    let frank = app.shopper("frank");
    let (status, theirs) = app.purchase(&frank, &sale, "erin-key-1", 2).await;
    assert_eq!(status, 201, "{theirs}");
    assert_ne!(theirs["order_id"], first["order_id"]);

    // No key.
    let before = snapshot(&app, &sale, &token).await;
    let reply = app
        .post_raw(
            &format!("/v1/flash-sales/{sale}/purchase"),
            Some(&token),
            None,
            r#"{"quantity": 1}"#,
        )
        .await;
    assert_error(&reply, 400, "missing_idempotency_key");
    // An empty key (or one of spaces, which HTTP trims away) is no key.
    for empty in ["", "   "] {
        let reply = app
            .post_raw(
                &format!("/v1/flash-sales/{sale}/purchase"),
                Some(&token),
                Some(empty),
                r#"{"quantity": 1}"#,
            )
            .await;
        assert_error(&reply, 400, "missing_idempotency_key");
    }
    // Two keys on one request: which is the key is not for the server to guess.
    let reply = send(
        app.client
            .post(app.url(&format!("/v1/flash-sales/{sale}/purchase")))
            .header("content-type", "application/json")
            .bearer_auth(&token)
            .header("idempotency-key", "two-1")
            .header("idempotency-key", "two-2")
            .body(r#"{"quantity": 1}"#),
    )
    .await;
    assert_error(&reply, 400, "invalid_field");
    assert_eq!(
        snapshot(&app, &sale, &token).await,
        before,
        "a refused purchase changes nothing"
    );
    assert_books(&app.audit(&sale).await);
}

async fn per_user_limit_is_enforced(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("WATCH-1", 10, 2).await;
    let token = app.shopper("gina");

    app.buy(&token, &sale, "g-1", 1).await;
    let reply = app.purchase_reply(&token, &sale, "g-2", 2).await;
    assert_error(&reply, 409, "limit_exceeded");
    app.buy(&token, &sale, "g-3", 1).await;
    let reply = app.purchase_reply(&token, &sale, "g-4", 1).await;
    assert_error(&reply, 409, "limit_exceeded");

    // One purchase above the limit on its own.
    let hank = app.shopper("hank");
    let reply = app.purchase_reply(&hank, &sale, "h-1", 3).await;
    assert_error(&reply, 409, "limit_exceeded");

    assert_eq!(app.remaining(&sale).await, 8);
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["pending_payment"], 2);
}

async fn sold_out_when_the_stock_is_gone(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("GPU-1", 3, 3).await;
    let ivy = app.shopper("ivy");
    let jack = app.shopper("jack");

    app.buy(&ivy, &sale, "i-1", 2).await;
    let reply = app.purchase_reply(&jack, &sale, "j-1", 2).await;
    assert_error(&reply, 409, "sold_out");
    app.buy(&jack, &sale, "j-2", 1).await;
    let reply = app.purchase_reply(&jack, &sale, "j-3", 1).await;
    assert_error(&reply, 409, "sold_out");

    let view = app.sale(&sale).await;
    assert_eq!(view["remaining"], 0);
    assert_eq!(view["status"], "sold_out");
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["pending_payment"], 3);

    // The key of a refused purchase is not burnt: once stock returns it buys.
    let ivy_order = app.orders(&ivy).await[0]["order_id"]
        .as_str()
        .expect("order id")
        .to_owned();
    assert_eq!(app.cancel(&ivy, &ivy_order).await.status, 200);
    let (status, body) = app.purchase(&jack, &sale, "j-1", 2).await;
    assert_eq!(
        status, 201,
        "jack holds 1 of a limit of 3 and asks for 2: {body}"
    );
    assert_books(&app.audit(&sale).await);
}

// ---- bad input -------------------------------------------------------------------------------

async fn bad_purchase_bodies_are_refused_and_change_nothing(backend: Backend) {
    // One shopper sends more than the shipped limit's burst of 20 attempts here, which
    // counts malformed ones too (tests/guard.rs): without that rule, each is judged.
    let app = spawn_app_on_with(backend, |config| config.guard.hot.clear()).await;
    let sale = app.live_sale("KB-1", 20, 5).await;
    let token = app.shopper("kim");
    app.buy(&token, &sale, "kim-0", 1).await;
    let path = format!("/v1/flash-sales/{sale}/purchase");
    let before = snapshot(&app, &sale, &token).await;

    let cases: &[(&str, &str, &[&str])] = &[
        ("malformed", r#"{"quantity": 1"#, &["malformed_json"]),
        ("not json", "quantity=1", &["malformed_json"]),
        ("empty", "", &["malformed_json"]),
        // Not JSON, whatever its first character: the same code as any other.
        ("cut-short array", "[", &["malformed_json"]),
        ("cut-short string", r#""quantity"#, &["malformed_json"]),
        ("misspelt true", "tru", &["malformed_json"]),
        ("number then junk", "1x", &["malformed_json"]),
        // JSON, but not an object.
        ("array", r#"[1]"#, &["invalid_body"]),
        ("number", "1", &["invalid_body"]),
        (
            "unknown field",
            r#"{"quantity": 1, "coupon": "FREE"}"#,
            &["invalid_body"],
        ),
        ("missing field", r#"{}"#, &["invalid_body"]),
        ("null", r#"{"quantity": null}"#, &["invalid_body"]),
        (
            "zero",
            r#"{"quantity": 0}"#,
            &["invalid_field", "invalid_body"],
        ),
        (
            "negative",
            r#"{"quantity": -1}"#,
            &["invalid_field", "invalid_body"],
        ),
        (
            "too many",
            r#"{"quantity": 1001}"#,
            &["invalid_field", "invalid_body"],
        ),
        (
            "huge float",
            r#"{"quantity": 1e30}"#,
            &["invalid_field", "invalid_body"],
        ),
        (
            "fraction",
            r#"{"quantity": 1.5}"#,
            &["invalid_field", "invalid_body"],
        ),
        (
            "beyond i64",
            r#"{"quantity": 99999999999999999999}"#,
            &["invalid_field", "invalid_body"],
        ),
        (
            "string",
            r#"{"quantity": "2"}"#,
            &["invalid_field", "invalid_body"],
        ),
    ];
    for (i, (name, body, codes)) in cases.iter().enumerate() {
        let key = format!("bad-{i}");
        let reply = app.post_raw(&path, Some(&token), Some(&key), *body).await;
        assert_eq!(reply.status, 400, "{name}: {}", reply.body);
        let code = reply.error_code();
        assert!(
            codes.contains(&code),
            "{name}: unexpected code {code}: {}",
            reply.body
        );
        assert_eq!(
            snapshot(&app, &sale, &token).await,
            before,
            "{name}: a refused purchase changes nothing"
        );
    }

    // Not JSON at all by content type.
    let reply = send(
        app.client
            .post(app.url(&path))
            .bearer_auth(&token)
            .header("idempotency-key", "bad-ct")
            .header("content-type", "text/plain")
            .body(r#"{"quantity": 1}"#),
    )
    .await;
    assert_eq!(reply.status, 415, "{}", reply.body);
    assert_error_shape(&reply.body);

    // Bad idempotency keys.
    let long_key = "k".repeat(129);
    let reply = app
        .post_raw(&path, Some(&token), Some(&long_key), r#"{"quantity": 1}"#)
        .await;
    assert_error(&reply, 400, "invalid_field");
    let reply = app
        .post_raw(&path, Some(&token), Some(""), r#"{"quantity": 1}"#)
        .await;
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert_error_shape(&reply.body);

    assert_eq!(
        snapshot(&app, &sale, &token).await,
        before,
        "refused keys change nothing"
    );

    // A refused request does not burn its key: the same key with a good body buys.
    let order_id = app.buy(&token, &sale, "bad-0", 1).await;
    assert_eq!(
        app.remaining(&sale).await,
        before.0["remaining"].as_u64().expect("remaining") - 1
    );
    assert_eq!(app.order_status(&token, &order_id).await, "pending_payment");
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["pending_payment"], 2);
}

/// The contract's bodies are JSON objects. serde's derive also accepts a JSON array of
/// the fields in declaration order (`[1]` for `{"quantity": 1}`), which slips past
/// `deny_unknown_fields` and places orders and creates products from non-object bodies.
async fn request_bodies_must_be_json_objects(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("ARR-1", 20, 5).await;
    let token = app.shopper("arno");
    let before = snapshot(&app, &sale, &token).await;

    let purchase = app
        .post_raw(
            &format!("/v1/flash-sales/{sale}/purchase"),
            Some(&token),
            Some("arr-1"),
            "[1]",
        )
        .await;
    let after = snapshot(&app, &sale, &token).await;
    let product = app
        .post_raw(
            "/v1/products",
            Some(&app.admin),
            None,
            r#"["ARR-2", "Array product", 100, 5]"#,
        )
        .await;
    let created = app.get("/v1/products/ARR-2", None).await;
    assert!(
        purchase.status == 400 && product.status == 400,
        "array bodies were accepted: purchase [1] → {} {}; product [..] → {} {}",
        purchase.status,
        purchase.body,
        product.status,
        product.body
    );
    assert_error(&purchase, 400, "invalid_body");
    assert_error(&product, 400, "invalid_body");
    assert_eq!(after, before, "a refused purchase changes nothing");
    assert_eq!(created.status, 404, "no product from an array body");
}

async fn oversized_body_is_413_and_changes_nothing(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("BIG-1", 20, 5).await;
    let token = app.shopper("lena");
    let before = snapshot(&app, &sale, &token).await;

    let path = format!("/v1/flash-sales/{sale}/purchase");
    let padding = " ".repeat(100 * 1024);
    let body = format!(r#"{{"quantity": 1{padding}}}"#);
    let reply = app.post_raw(&path, Some(&token), Some("big-1"), body).await;
    assert_error(&reply, 413, "body_too_large");
    assert_eq!(snapshot(&app, &sale, &token).await, before);

    // Also on an admin route.
    let body = format!(
        r#"{{"sku": "BIG-2", "name": "{}", "price_cents": 1, "stock": 1}}"#,
        "n".repeat(100 * 1024)
    );
    let reply = app
        .post_raw("/v1/products", Some(&app.admin), None, body)
        .await;
    assert_error(&reply, 413, "body_too_large");
    assert_eq!(app.get("/v1/products/BIG-2", None).await.status, 404);

    // The server still serves.
    app.buy(&token, &sale, "big-2", 1).await;
}

async fn bad_tokens_are_401_and_change_nothing(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("PEN-1", 20, 5).await;
    let token = app.shopper("mia");
    let path = format!("/v1/flash-sales/{sale}/purchase");
    let before = snapshot(&app, &sale, &token).await;

    let wrong_secret = stampede_api::mint_shopper_token(
        &stampede_api::Secret::new("another-secret"),
        "mia",
        Some(now_s() + 3_600),
    );
    let expired = stampede_api::mint_shopper_token(&app.jwt_secret, "mia", Some(now_s() - 60));
    // Ids the database would take for "mia" (MariaDB ignores trailing spaces): a
    // shopper of their own to the engine, so refused.
    let padded = stampede_api::mint_shopper_token(&app.jwt_secret, "mia ", Some(now_s() + 3_600));
    let leading = stampede_api::mint_shopper_token(&app.jwt_secret, " mia", Some(now_s() + 3_600));
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });

    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("garbage", Some("garbage".into())),
        ("empty", Some(String::new())),
        ("wrong secret", Some(wrong_secret)),
        ("expired", Some(expired)),
        ("tampered", Some(tampered)),
        ("admin token is no shopper", Some(app.admin.clone())),
        ("sub ending in a space", Some(padded)),
        ("sub beginning with a space", Some(leading)),
    ];
    for (name, bad) in &cases {
        let mut request = app
            .client
            .post(app.url(&path))
            .header("idempotency-key", format!("tok-{name}"))
            .json(&json!({"quantity": 1}));
        if let Some(bad) = bad {
            request = request.header("authorization", format!("Bearer {bad}"));
        }
        let reply = send(request).await;
        assert_eq!(reply.status, 401, "{name}: {}", reply.body);
        assert_error_shape(&reply.body);
        assert_eq!(
            snapshot(&app, &sale, &token).await,
            before,
            "{name}: nothing changes"
        );
    }

    // Not the Bearer scheme.
    let reply = send(
        app.client
            .post(app.url(&path))
            .header("authorization", format!("Basic {token}"))
            .header("idempotency-key", "tok-basic")
            .json(&json!({"quantity": 1})),
    )
    .await;
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert_error_shape(&reply.body);

    // Orders and audit need a token too.
    assert_eq!(app.get("/v1/orders", None).await.status, 401);
    assert_eq!(
        app.get(&format!("/v1/flash-sales/{sale}/audit"), None)
            .await
            .status,
        401
    );
    assert_eq!(
        app.get(&format!("/v1/flash-sales/{sale}/audit"), Some(&token))
            .await
            .status,
        401
    );
    assert_eq!(snapshot(&app, &sale, &token).await, before);
}

async fn other_shoppers_orders_are_404(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("MUG-1", 20, 5).await;
    let owner = app.shopper("nora");
    let other = app.shopper("oscar");
    let order_id = app.buy(&owner, &sale, "n-1", 2).await;
    let before = snapshot(&app, &sale, &owner).await;

    assert_error(&app.order(&other, &order_id).await, 404, "order_not_found");
    assert_error(&app.pay(&other, &order_id).await, 404, "order_not_found");
    assert_error(&app.cancel(&other, &order_id).await, 404, "order_not_found");
    assert!(app.orders(&other).await.is_empty());
    assert_eq!(
        snapshot(&app, &sale, &owner).await,
        before,
        "nothing changed"
    );
    assert!(
        app.sim.charge(&order_id).await.is_none(),
        "nobody was charged"
    );

    // Garbage and unknown ids.
    for id in [
        "garbage",
        "ord_",
        "ord_not-a-uuid",
        "ord_0190a0b0c0d07e0f8a9b0c1d2e3f4a5b",
    ] {
        assert_error(&app.order(&owner, id).await, 404, "order_not_found");
        assert_error(&app.pay(&owner, id).await, 404, "order_not_found");
        assert_error(&app.cancel(&owner, id).await, 404, "order_not_found");
        assert_error(&app.order(&app.admin, id).await, 404, "order_not_found");
    }
    assert_eq!(app.order_status(&owner, &order_id).await, "pending_payment");
}

// ---- orders ------------------------------------------------------------------------------

async fn orders_are_visible_to_owner_and_admin_and_listed_per_shopper(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("HAT-1", 20, 5).await;
    let pia = app.shopper("pia");
    let quinn = app.shopper("quinn");

    let (_, placed) = app.purchase(&pia, &sale, "p-1", 2).await;
    let order_id = placed["order_id"].as_str().expect("order id").to_owned();
    let p2 = app.buy(&pia, &sale, "p-2", 1).await;
    let q1 = app.buy(&quinn, &sale, "q-1", 3).await;

    for token in [&pia, &app.admin] {
        let reply = app.order(token, &order_id).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let order = &reply.body;
        assert_eq!(order["order_id"], order_id.as_str());
        assert_eq!(order["user_id"], "pia");
        assert_eq!(order["sale_id"], sale.as_str());
        assert_eq!(order["quantity"], 2);
        assert_eq!(order["amount_cents"], 2 * 999);
        assert_eq!(order["status"], "pending_payment");
        assert_eq!(order["expires_at"], placed["expires_at"]);
        let created =
            chrono::DateTime::parse_from_rfc3339(order["created_at"].as_str().expect("created_at"))
                .expect("created_at is RFC 3339");
        let expires =
            chrono::DateTime::parse_from_rfc3339(order["expires_at"].as_str().expect("expires_at"))
                .expect("expires_at is RFC 3339");
        assert!(expires > created);
    }

    let listed: Vec<String> = app
        .orders(&pia)
        .await
        .iter()
        .map(|o| o["order_id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(
        listed,
        vec![p2.clone(), order_id.clone()],
        "own orders, newest first"
    );
    assert!(
        listed.contains(&order_id) && listed.contains(&p2),
        "{listed:?}"
    );
    assert!(!listed.contains(&q1));
    let listed: Vec<Value> = app.orders(&quinn).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["order_id"], q1.as_str());
    assert_eq!(listed[0]["user_id"], "quinn");
    assert!(app.orders(&app.shopper("nobody")).await.is_empty());
}

// ---- cancel ------------------------------------------------------------------------------

async fn cancel_returns_stock_and_a_paid_order_cannot_be_cancelled(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("LAMP-1", 10, 3).await;
    let rose = app.shopper("rose");

    let first = app.buy(&rose, &sale, "r-1", 3).await;
    assert_eq!(app.remaining(&sale).await, 7);
    let reply = app.cancel(&rose, &first).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body, json!({"status": "cancelled"}));
    assert_eq!(app.remaining(&sale).await, 10, "stock returns");
    assert_eq!(app.order_status(&rose, &first).await, "cancelled");
    // Cancelling twice is not an error; paying a cancelled order is.
    assert_eq!(app.cancel(&rose, &first).await.status, 200);
    assert_error(&app.pay(&rose, &first).await, 409, "order_cancelled");
    assert!(
        app.sim.charge(&first).await.is_none(),
        "a cancelled order is never charged"
    );

    // The units and the per-user allowance come back: she can buy 3 again.
    let second = app.buy(&rose, &sale, "r-2", 3).await;
    assert_eq!(app.pay(&rose, &second).await.status, 200);
    assert_error(&app.cancel(&rose, &second).await, 409, "order_paid");
    assert_error(&app.cancel(&app.admin, &second).await, 409, "order_paid");
    assert_eq!(app.order_status(&rose, &second).await, "paid");
    assert_eq!(app.remaining(&sale).await, 7);

    // The admin may cancel a shopper's order.
    let sam = app.shopper("sam");
    let third = app.buy(&sam, &sale, "s-1", 2).await;
    let reply = app.cancel(&app.admin, &third).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(app.remaining(&sale).await, 7);

    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["paid"], 3);
    assert_eq!(audit["cancelled"], 5);
    assert_eq!(audit["pending_payment"], 0);
}

// ---- pay ------------------------------------------------------------------------------------

async fn pay_marks_paid_and_charges_once(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("BIKE-1", 10, 3).await;
    let tom = app.shopper("tom");
    let order_id = app.buy(&tom, &sale, "t-1", 2).await;

    let reply = app.pay(&tom, &order_id).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body, json!({"status": "paid"}));
    assert_eq!(app.order_status(&tom, &order_id).await, "paid");

    let reply = app.pay(&tom, &order_id).await;
    assert_eq!(
        reply.status, 200,
        "paying twice is not an error: {}",
        reply.body
    );
    assert_eq!(reply.body, json!({"status": "paid"}));

    let charge = app
        .sim
        .charge(&order_id)
        .await
        .expect("the order was charged under its id");
    assert_eq!(charge["charged"], 1, "{charge}");
    assert_eq!(charge["amount_cents"], 2 * 999, "{charge}");
    assert_eq!(charge["refunded"], false, "{charge}");
    assert_eq!(app.sim.stats().await["charges"], 1);

    // The admin token is not a shopper's: it cannot pay.
    let other = app.buy(&tom, &sale, "t-2", 1).await;
    assert_eq!(app.pay(&app.admin, &other).await.status, 401);
    assert!(app.sim.charge(&other).await.is_none());

    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["paid"], 2);
    assert_eq!(audit["pending_payment"], 1);
}

async fn payment_failure_is_502_and_the_order_stays_payable(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("SOFA-1", 10, 3).await;
    let uma = app.shopper("uma");
    let order_id = app.buy(&uma, &sale, "u-1", 1).await;

    app.sim.configure(0, 1.0).await;
    for _ in 0..2 {
        let reply = app.pay(&uma, &order_id).await;
        assert_error(&reply, 502, "payment_failed");
        assert_eq!(app.order_status(&uma, &order_id).await, "pending_payment");
    }
    assert!(app.sim.charge(&order_id).await.is_none(), "no money moved");
    assert_eq!(
        app.remaining(&sale).await,
        9,
        "the order still holds its unit"
    );

    app.sim.configure(0, 0.0).await;
    let reply = app.pay(&uma, &order_id).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(app.order_status(&uma, &order_id).await, "paid");
    let charge = app.sim.charge(&order_id).await.expect("charged");
    assert_eq!(charge["charged"], 1, "{charge}");
    assert_books(&app.audit(&sale).await);
}

async fn payment_timeout_is_504_and_the_order_stays_payable(backend: Backend) {
    let app = spawn_app_on_with(backend, |config| {
        config.payment_timeout = Duration::from_millis(300)
    })
    .await;
    let sale = app.live_sale("DESK-1", 10, 3).await;
    let vic = app.shopper("vic");
    let order_id = app.buy(&vic, &sale, "v-1", 1).await;

    app.sim.configure(1_500, 0.0).await;
    let reply = app.pay(&vic, &order_id).await;
    assert_error(&reply, 504, "payment_timeout");
    assert_eq!(app.order_status(&vic, &order_id).await, "pending_payment");
    assert_eq!(app.remaining(&sale).await, 9);

    app.sim.configure(0, 0.0).await;
    let reply = app.pay(&vic, &order_id).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(app.order_status(&vic, &order_id).await, "paid");

    // The timed-out call may still land at the provider; the order id is the charge's
    // idempotency key, so money moves once whichever call lands first.
    let charge = app.sim.charge(&order_id).await.expect("charged");
    assert_eq!(charge["charged"], 1, "{charge}");
    assert_eq!(
        app.sim.stats().await["attempts"],
        2,
        "two calls reached the provider"
    );
    assert_eq!(app.sim.stats().await["charges"], 1);
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["paid"], 1);
}

async fn pay_racing_a_cancel_decides_one_winner_and_refunds(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("RACE-1", 5, 2).await;
    let yuri = app.shopper("yuri");
    let order_id = app.buy(&yuri, &sale, "y-1", 2).await;

    // The provider is slow, so the cancel lands while the charge is under way.
    app.sim.configure(500, 0.0).await;
    let pay = app.pay(&yuri, &order_id);
    let cancel = async {
        eventually("the charge call to reach the provider", || async {
            (app.sim.stats().await["attempts"].as_u64() >= Some(1)).then_some(())
        })
        .await;
        app.cancel(&yuri, &order_id).await
    };
    let (pay, cancel) = tokio::join!(pay, cancel);
    assert_eq!(cancel.status, 200, "{}", cancel.body);
    assert_eq!(cancel.body, json!({"status": "cancelled"}));
    assert_error(&pay, 409, "order_cancelled");

    assert_eq!(app.order_status(&yuri, &order_id).await, "cancelled");
    assert_eq!(
        app.remaining(&sale).await,
        5,
        "the cancel returned the stock"
    );
    let charge = app
        .sim
        .charge(&order_id)
        .await
        .expect("the charge went through");
    assert_eq!(charge["charged"], 1, "{charge}");
    assert_eq!(
        charge["refunded"], true,
        "the losing pay refunds its charge: {charge}"
    );
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["cancelled"], 2);
    assert_eq!(audit["paid"], 0);
}

// ---- payment window ------------------------------------------------------------------------

fn short_window(config: &mut stampede::Config) {
    config.payment_window = Duration::from_secs(1);
    config.payment_timeout = Duration::from_millis(200);
}

async fn wait_expired(app: &TestApp, token: &str, order_id: &str) {
    eventually("the unpaid order to expire", || async {
        (app.order_status(token, order_id).await == "expired").then_some(())
    })
    .await;
}

/// Waits for the sale's remaining stock to read `units`. The writer hands an expired
/// order's units back once its commit returns, so a reader on another connection can see
/// the order `expired` a moment before the stock is back.
async fn wait_remaining(app: &TestApp, sale: &str, units: u64, what: &str) {
    eventually(what, || async {
        (app.remaining(sale).await == units).then_some(())
    })
    .await;
}

async fn an_unpaid_order_expires_and_its_stock_returns(backend: Backend) {
    let app = spawn_app_on_with(backend, short_window).await;
    let sale = app.live_sale("FAN-1", 5, 2).await;
    let wes = app.shopper("wes");

    let (status, placed) = app.purchase(&wes, &sale, "w-1", 2).await;
    assert_eq!(status, 201, "{placed}");
    let order_id = placed["order_id"].as_str().expect("id").to_owned();
    let order = app.order(&wes, &order_id).await.body;
    let created =
        chrono::DateTime::parse_from_rfc3339(order["created_at"].as_str().expect("created_at"))
            .expect("time");
    let expires =
        chrono::DateTime::parse_from_rfc3339(order["expires_at"].as_str().expect("expires_at"))
            .expect("time");
    assert_eq!(
        (expires - created).num_milliseconds(),
        1_000,
        "payment window of 1 s: {order}"
    );
    assert_eq!(app.remaining(&sale).await, 3);

    wait_expired(&app, &wes, &order_id).await;
    wait_remaining(&app, &sale, 5, "stock returns on expiry").await;
    assert_error(&app.pay(&wes, &order_id).await, 409, "order_expired");
    assert_error(&app.cancel(&wes, &order_id).await, 409, "order_expired");
    assert!(
        app.sim.charge(&order_id).await.is_none(),
        "an expired order is never charged"
    );
    assert_eq!(app.order_status(&wes, &order_id).await, "expired");

    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["expired"], 2);
    assert_eq!(audit["pending_payment"], 0);
    assert_eq!(audit["remaining"], 5);

    // The allowance returns too.
    app.buy(&wes, &sale, "w-2", 2).await;
}

/// A payment that starts before `expires_at` is decided before the expiry (which waits
/// one provider timeout plus a second): the payer is not robbed.
async fn pay_started_just_before_the_deadline_wins_over_expiry(backend: Backend) {
    let app = spawn_app_on_with(backend, |config| {
        config.payment_window = Duration::from_secs(1);
        config.payment_timeout = Duration::from_millis(1_500);
    })
    .await;
    let sale = app.live_sale("LATE-1", 5, 2).await;
    let zed = app.shopper("zed");
    let (status, placed) = app.purchase(&zed, &sale, "z-1", 1).await;
    assert_eq!(status, 201, "{placed}");
    let order_id = placed["order_id"].as_str().expect("id").to_owned();
    let expires_at =
        chrono::DateTime::parse_from_rfc3339(placed["expires_at"].as_str().expect("expires_at"))
            .expect("RFC 3339")
            .with_timezone(&chrono::Utc);

    // Pacing, not a timing assertion: start paying ~300 ms before the deadline, with a
    // provider that answers ~700 ms after it (well inside the 1.5 s timeout).
    app.sim.configure(1_000, 0.0).await;
    let until_start = (expires_at - chrono::Duration::milliseconds(300)) - chrono::Utc::now();
    if let Ok(pause) = until_start.to_std() {
        tokio::time::sleep(pause).await;
    }
    let reply = app.pay(&zed, &order_id).await;
    assert_eq!(
        reply.status, 200,
        "a pay started before the deadline wins: {}",
        reply.body
    );
    assert_eq!(app.order_status(&zed, &order_id).await, "paid");

    // Once the expiry's own deadline has passed it must have left the paid order alone.
    let expiry_due = expires_at + chrono::Duration::milliseconds(2_500 + 200);
    if let Ok(pause) = (expiry_due - chrono::Utc::now()).to_std() {
        tokio::time::sleep(pause).await;
    }
    assert_eq!(app.order_status(&zed, &order_id).await, "paid");
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["paid"], 1);
    assert_eq!(audit["expired"], 0);
    let charge = app.sim.charge(&order_id).await.expect("charged");
    assert_eq!(
        (charge["charged"].clone(), charge["refunded"].clone()),
        (json!(1), json!(false)),
        "{charge}"
    );
}

async fn a_cached_token_stops_working_when_it_expires(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("EXP-1", 5, 2).await;
    let token = stampede_api::mint_shopper_token(&app.jwt_secret, "ephemeral", Some(now_s() + 2));
    app.buy(&token, &sale, "e-1", 1).await;
    assert_eq!(
        app.orders(&token).await.len(),
        1,
        "the token works (and is now cached)"
    );

    let reply = eventually("the token to expire", || async {
        let reply = app.get("/v1/orders", Some(&token)).await;
        (reply.status != 200).then_some(reply)
    })
    .await;
    assert_error(&reply, 401, "token_expired");
    let before = app.audit(&sale).await;
    let reply = app.purchase_reply(&token, &sale, "e-2", 1).await;
    assert_error(&reply, 401, "token_expired");
    assert_eq!(app.audit(&sale).await, before);
    assert_eq!(app.remaining(&sale).await, 4);
}

async fn expiry_survives_a_graceful_restart(backend: Backend) {
    let mut app = spawn_app_on_with(backend, short_window).await;
    let sale = app.live_sale("HEATER-1", 5, 3).await;
    let xena = app.shopper("xena");
    let expiring = app.buy(&xena, &sale, "x-1", 2).await;
    let paid = app.buy(&xena, &sale, "x-2", 1).await;
    assert_eq!(app.pay(&xena, &paid).await.status, 200);

    app.restart().await;

    wait_expired(&app, &xena, &expiring).await;
    wait_remaining(&app, &sale, 4, "the expired order's stock to return").await;
    assert_eq!(
        app.order_status(&xena, &paid).await,
        "paid",
        "a paid order never expires"
    );
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["expired"], 2);
    assert_eq!(audit["paid"], 1);
    assert_eq!(audit["pending_payment"], 0);
    assert_eq!(audit["remaining"], 4);
}

// ---- audit -----------------------------------------------------------------------------------

async fn audit_adds_up_after_a_mix_of_purchases_payments_and_cancels(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("KIT-1", 20, 5).await;
    let a = app.shopper("ann");
    let b = app.shopper("ben");
    let c = app.shopper("cat");
    let d = app.shopper("don");

    let a1 = app.buy(&a, &sale, "a-1", 2).await;
    let b1 = app.buy(&b, &sale, "b-1", 3).await;
    app.buy(&c, &sale, "c-1", 1).await;
    let d1 = app.buy(&d, &sale, "d-1", 4).await;
    let d2 = app.buy(&d, &sale, "d-2", 1).await;
    assert_eq!(app.pay(&a, &a1).await.status, 200);
    assert_eq!(app.cancel(&b, &b1).await.status, 200);
    assert_eq!(app.pay(&d, &d1).await.status, 200);
    assert_eq!(app.cancel(&app.admin, &d2).await.status, 200);
    assert_error(
        &app.purchase_reply(&d, &sale, "d-3", 2).await,
        409,
        "limit_exceeded",
    );

    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(
        audit,
        json!({
            "quantity": 20, "remaining": 13, "pending_payment": 1, "paid": 6, "cancelled": 4,
            "expired": 0, "in_flight": 0, "users_over_limit": 0, "consistent": true,
        })
    );
    assert_eq!(app.remaining(&sale).await, 13);
    assert_eq!(app.sim.stats().await["charges"], 2);

    // Unknown sale.
    let reply = app
        .get(
            "/v1/flash-sales/sale_0190a0b0c0d07e0f8a9b0c1d2e3f4a5b/audit",
            Some(&app.admin),
        )
        .await;
    assert_eq!(reply.status, 404);
    assert_error_shape(&reply.body);
}

// ---- operations --------------------------------------------------------------------------------

async fn operations_endpoints_answer(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("OPS-1", 5, 1).await;
    app.buy(&app.shopper("olga"), &sale, "o-1", 1).await;

    let reply = app.get("/healthz", None).await;
    assert_eq!(reply.status, 200);
    let reply = app.get("/readyz", None).await;
    assert_eq!(reply.status, 200);

    let reply = app.get("/metrics", None).await;
    assert_eq!(reply.status, 200);
    let text = reply.body.as_str().expect("metrics are text");
    assert!(text.contains("stampede_purchases_total"), "{text}");
    // Counters of things going wrong are there before anything went wrong, so an alert on
    // them reads 0, not "no data".
    for counter in [
        "stampede_writer_commit_failures_total",
        "stampede_refund_failures_total",
        "stampede_refunds_total{outcome=\"failed\"}",
        "stampede_http_unparsable_total{status=\"431\"}",
        "stampede_guard_refusals_held_total",
    ] {
        assert!(
            text.lines().any(|line| line.starts_with(counter)),
            "{counter} is not exported: {text}"
        );
    }

    let reply = app.get("/openapi.json", None).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json")),
        "{:?}",
        reply.headers
    );
    let paths = reply.body["paths"]
        .as_object()
        .expect("openapi.json has paths");
    for path in [
        "/v1/flash-sales/{id}/purchase",
        "/v1/products",
        "/v1/orders/{id}/pay",
        "/v1/flash-sales/{id}/audit",
    ] {
        assert!(paths.contains_key(path), "openapi.json lacks {path}");
    }
    // Every answer the contract names for a route is in its document, so a generated
    // client models each of them.
    for (path, method, statuses) in [
        (
            "/v1/flash-sales/{id}/purchase",
            "post",
            &[
                "200", "201", "400", "401", "404", "409", "422", "429", "503",
            ][..],
        ),
        ("/v1/orders/{id}", "get", &["200", "401", "404"][..]),
        ("/v1/orders", "get", &["200", "401"][..]),
        (
            "/v1/orders/{id}/pay",
            "post",
            &["200", "400", "401", "404", "409", "502", "504"][..],
        ),
        (
            "/v1/orders/{id}/cancel",
            "post",
            &["200", "401", "404", "409"][..],
        ),
        (
            "/v1/flash-sales/{id}/audit",
            "get",
            &["200", "401", "404", "429", "503"][..],
        ),
        // What the layers around the handlers answer is documented too.
        (
            "/v1/flash-sales",
            "post",
            &["201", "400", "401", "404", "409", "413", "415"][..],
        ),
        (
            "/v1/flash-sales/{id}",
            "get",
            &["200", "404", "429", "503"][..],
        ),
        (
            "/v1/guard/rules",
            "put",
            &["200", "400", "401", "409", "413", "415", "503"][..],
        ),
        (
            "/v1/guard/degrade",
            "post",
            &["200", "400", "401", "413", "415", "503"][..],
        ),
        ("/openapi.json", "get", &["200", "429", "503"][..]),
    ] {
        let responses = paths[path][method]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("openapi.json: {method} {path} has no responses"));
        for status in statuses {
            assert!(
                responses.contains_key(*status),
                "openapi.json: {method} {path} lacks {status}"
            );
        }
    }

    let reply = app.get("/v1/nothing-here", None).await;
    assert_error(&reply, 404, "not_found");
    let reply = app.get("/", None).await;
    assert_error(&reply, 404, "not_found");
    let reply = app.post_json("/healthz-nope", None, &json!({})).await;
    assert_error(&reply, 404, "not_found");
    let reply = send(app.client.delete(app.url("/v1/products"))).await;
    assert_eq!(reply.status, 405, "{}", reply.body);
    assert_error_shape(&reply.body);
    // A path parameter that does not decode is bad input like any other: JSON, a code.
    for path in [
        "/v1/products/%FF",
        "/v1/flash-sales/%C3%28",
        "/v1/orders/%FF",
    ] {
        let reply = app.get(path, Some(&app.admin)).await;
        assert_error(&reply, 400, "invalid_path");
    }
}

// ---- restart ---------------------------------------------------------------------------------

async fn graceful_restart_keeps_everything(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    let sale = app.live_sale("RST-1", 10, 3).await;
    app.create_product("RST-SPARE", 7).await;
    let yan = app.shopper("yan");
    let zoe = app.shopper("zoe");

    let (_, y1_body) = app.purchase(&yan, &sale, "y-1", 2).await;
    let y1 = y1_body["order_id"].as_str().expect("id").to_owned();
    let y2 = app.buy(&yan, &sale, "y-2", 1).await;
    let z1 = app.buy(&zoe, &sale, "z-1", 3).await;
    assert_eq!(app.pay(&yan, &y2).await.status, 200);
    assert_eq!(app.cancel(&zoe, &z1).await.status, 200);
    let sale_before = app.sale(&sale).await;
    let audit_before = app.audit(&sale).await;
    let yan_orders = app.orders(&yan).await;

    app.restart().await;

    assert_eq!(app.sale(&sale).await, sale_before);
    assert_eq!(app.audit(&sale).await, audit_before);
    assert_books(&audit_before);
    assert_eq!(app.orders(&yan).await, yan_orders);
    assert_eq!(app.product("RST-SPARE").await["available"], 7);
    assert_eq!(app.product("RST-1").await["available"], 0);
    assert_eq!(app.order_status(&yan, &y1).await, "pending_payment");
    assert_eq!(app.order_status(&yan, &y2).await, "paid");
    assert_eq!(app.order_status(&app.admin, &z1).await, "cancelled");

    // Replays of keys from before the restart answer the same order.
    let (status, replay) = app.purchase(&yan, &sale, "y-1", 2).await;
    assert_eq!(status, 200, "{replay}");
    assert_eq!(replay, y1_body);
    let reply = app.purchase_reply(&yan, &sale, "y-1", 1).await;
    assert_error(&reply, 422, "idempotency_key_reused");
    // The limit counts orders from before the restart.
    assert_error(
        &app.purchase_reply(&yan, &sale, "y-3", 1).await,
        409,
        "limit_exceeded",
    );

    // And it goes on selling.
    assert_eq!(app.pay(&yan, &y1).await.status, 200);
    app.buy(&zoe, &sale, "z-2", 3).await;
    let audit = app.audit(&sale).await;
    assert_books(&audit);
    assert_eq!(audit["paid"], 3);
    assert_eq!(audit["pending_payment"], 3);
    assert_eq!(audit["remaining"], 4);
    assert_eq!(app.sim.charge(&y2).await.expect("charged")["charged"], 1);
}

async fn a_second_server_on_the_same_data_directory_is_refused(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let mut second = app.config.clone();
    second.listen = "127.0.0.1:0".parse().unwrap();
    let refused = stampede::start(&second, std::future::pending()).await;
    let error = refused
        .err()
        .expect("two writers on one database must be refused");
    assert!(
        format!("{error:#}").contains("another stampede process"),
        "{error:#}"
    );
    // The first server still sells.
    let sale = app.live_sale("LOCK-1", 5, 1).await;
    let (status, _) = app.purchase(&app.shopper("ann"), &sale, "k", 1).await;
    assert_eq!(status, 201);
}

/// Two servers with data directories of their own, given one `sqlite://` file: the
/// second is refused (each would sell the whole stock from its own memory). A
/// read-only `stampede audit`-style open beside the first is not a writer and goes on.
#[tokio::test]
async fn a_second_server_on_the_same_sqlite_file_is_refused() {
    let shared = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", shared.path().join("shop.db").display());
    let app = spawn_app_on_with(Backend::Sqlite, |config| {
        config.database_url = Some(url.clone())
    })
    .await;
    let other_dir = tempfile::tempdir().unwrap();
    let mut second = app.config.clone();
    second.listen = "127.0.0.1:0".parse().unwrap();
    second.data_dir = other_dir.path().to_path_buf();
    let error = stampede::start(&second, std::future::pending())
        .await
        .err()
        .expect("two writers on one SQLite file must be refused");
    let error = format!("{error:#}");
    assert!(
        error.contains("another stampede process") && error.contains("shop.db"),
        "{error}"
    );
    let sale = app.live_sale("LOCK-2", 5, 1).await;
    let (status, _) = app.purchase(&app.shopper("ann"), &sale, "k", 1).await;
    assert_eq!(status, 201);
    let reader = stampede_store::open_read_only(Some(&url), other_dir.path())
        .await
        .expect("a reader beside the writer");
    reader.ping().await.expect("the reader reads");
}

/// `stampede audit` reads the books beside a live server and writes nothing: given a data
/// directory with no database it fails and leaves no database behind.
#[tokio::test]
async fn stampede_audit_reads_beside_a_live_server_and_creates_nothing() {
    let app = spawn_app_on(Backend::Sqlite).await;
    let sale = app.live_sale("AUD-1", 5, 2).await;
    app.buy(&app.shopper("ada"), &sale, "a-1", 2).await;
    let audit = |data_dir: &std::path::Path| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_stampede"))
            .args(["audit", "--data-dir"])
            .arg(data_dir)
            .env_remove("STAMPEDE_DATABASE_URL")
            .output()
    };
    let output = audit(app.data_dir.path())
        .await
        .expect("run stampede audit");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "{sale} quantity=5 remaining=3 pending_payment=2 paid=0"
        )) && stdout.contains("consistent=true"),
        "{stdout}"
    );
    // The server still sells after the audit.
    app.buy(&app.shopper("bea"), &sale, "b-1", 1).await;

    let empty = tempfile::tempdir().unwrap();
    let output = audit(empty.path()).await.expect("run stampede audit");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no database"), "{stderr}");
    assert!(
        std::fs::read_dir(empty.path()).unwrap().next().is_none(),
        "the audit wrote into an empty data directory"
    );
}

/// `stampede token` signs with the secret a server keeps in its data directory, and
/// refuses rather than making one where no server keeps it (a mistyped `--data-dir`
/// used to get a fresh secret and print tokens every server answers with 401), as it
/// refuses a shopper id or a lifetime the server would not take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_token_signs_with_the_kept_secret_and_refuses_what_no_server_takes() {
    let app = spawn_app_on(Backend::Sqlite).await;
    let token = |data_dir: &std::path::Path, args: &[&str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_stampede"))
            .arg("token")
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("STAMPEDE_JWT_SECRET")
            .env_remove("STAMPEDE_CONFIG")
            .output()
    };
    // A data directory holding the server's secret, as its first start leaves it.
    let kept = tempfile::tempdir().unwrap();
    std::fs::write(kept.path().join("jwt-secret"), common::JWT_SECRET).unwrap();
    let output = token(kept.path(), &["--sub", "ada"]).await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let minted = String::from_utf8(output.stdout).unwrap();
    let listed = app.get("/v1/orders", Some(minted.trim())).await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);

    let empty = tempfile::tempdir().unwrap();
    let refused: [(&std::path::Path, &[&str], &str); 5] = [
        (empty.path(), &["--sub", "ada"], "no JWT secret"),
        (kept.path(), &["--sub", ""], "--sub"),
        (kept.path(), &["--sub", "ada", "--ttl", "0s"], "--ttl"),
        (kept.path(), &["--sub", &"a".repeat(129)], "--sub"),
        (kept.path(), &["--sub", "", "--count", "3"], "--sub"),
    ];
    for (data_dir, args, says) in refused {
        let output = token(data_dir, args).await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} printed a token");
        assert!(output.stdout.is_empty(), "{args:?}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    assert!(
        std::fs::read_dir(empty.path()).unwrap().next().is_none(),
        "the token command wrote into a data directory no server uses"
    );
}

async fn the_largest_orders_survive_a_restart(backend: Backend) {
    let mut app = spawn_app_on(backend).await;
    // A price of 600,000,000 cents (a realistic IDR price) times 2 units exceeds one
    // price's bound; the order must still read back.
    let product = json!({"sku": "BIG-1", "name": "big", "price_cents": 600_000_000, "stock": 10});
    assert_eq!(
        app.post_json("/v1/products", Some(&app.admin), &product)
            .await
            .status,
        201
    );
    let sale = app
        .post_json(
            "/v1/flash-sales",
            Some(&app.admin),
            &json!({"sku": "BIG-1", "price_cents": 600_000_000, "quantity": 4, "per_user_limit": 2,
                    "starts_at": rfc3339_in(chrono::Duration::seconds(-1)),
                    "ends_at": rfc3339_in(chrono::Duration::hours(1))}),
        )
        .await;
    assert_eq!(sale.status, 201, "{:?}", sale.body);
    let sale = sale.body["id"].as_str().unwrap().to_owned();
    let buyer = app.shopper("rich");
    let order = app.buy(&buyer, &sale, "big", 2).await;
    assert_eq!(
        app.order(&buyer, &order).await.body["amount_cents"],
        1_200_000_000
    );
    app.restart().await;
    assert_eq!(
        app.order(&buyer, &order).await.body["amount_cents"],
        1_200_000_000
    );
    assert_eq!(app.orders(&buyer).await.len(), 1);
    assert_books(&app.audit(&sale).await);
}

async fn a_charge_that_lands_after_a_timeout_is_refunded_when_the_order_is_cancelled(
    backend: Backend,
) {
    let app = spawn_app_on_with(backend, |config| {
        config.payment_timeout = Duration::from_millis(300)
    })
    .await;
    let sale = app.live_sale("LATE-1", 10, 3).await;
    let una = app.shopper("una");
    let order_id = app.buy(&una, &sale, "u-1", 1).await;

    // The provider answers after our timeout but does charge.
    app.sim.configure(1_000, 0.0).await;
    assert_error(&app.pay(&una, &order_id).await, 504, "payment_timeout");
    // The provider recovers (the slow call in flight still lands a second later).
    app.sim.configure(0, 0.0).await;
    assert_eq!(app.cancel(&una, &order_id).await.status, 200);
    assert_eq!(app.order_status(&una, &order_id).await, "cancelled");
    assert_eq!(app.remaining(&sale).await, 10);

    // The shopper must not keep paying for a cancelled order: the late charge is refunded.
    let charge = eventually("the late charge to be refunded", || async {
        app.sim
            .charge(&order_id)
            .await
            .filter(|c| c["refunded"] == true)
    })
    .await;
    assert_eq!(charge["charged"], 1, "{charge}");
    assert_books(&app.audit(&sale).await);
    // `/metrics` counts it among the refunds that gave money back (the recorder is the
    // process's, so other tests' refunds may be in the count too, never fewer).
    let metrics = app.get("/metrics", None).await;
    let text = metrics.body.as_str().expect("metrics are text");
    let refunded = text
        .lines()
        .find_map(|line| line.strip_prefix(r#"stampede_refunds_total{outcome="refunded"} "#))
        .and_then(|count| count.trim().parse::<f64>().ok());
    assert!(refunded.is_some_and(|n| n >= 1.0), "{text}");
}

async fn a_declined_payment_is_not_refunded(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let sale = app.live_sale("DECL-1", 10, 3).await;
    let ida = app.shopper("ida");
    let order_id = app.buy(&ida, &sale, "i-1", 1).await;
    app.sim.configure(0, 1.0).await;
    assert_error(&app.pay(&ida, &order_id).await, 502, "payment_failed");
    assert_eq!(app.cancel(&ida, &order_id).await.status, 200);
    // Nothing was charged; a refund attempt would find nothing and is harmless, but the
    // charge record must still show no money moved.
    assert!(
        app.sim
            .charge(&order_id)
            .await
            .is_none_or(|c| c["charged"] == 0)
    );
    assert_eq!(app.sim.stats().await["charges"], 0);
}

/// Pay and cancel take no body: a field there is refused (400), not ignored, and changes
/// nothing. The `Bearer` scheme and the JSON media type are read in any case, with
/// parameters; a SKU of dots alone, which clients would read as a path step, is refused.
#[tokio::test]
async fn bodies_schemes_media_types_and_skus_are_read_as_the_standards_say() {
    let app = spawn_app().await;
    let sale = app.live_sale("STD-1", 20, 5).await;
    let token = app.shopper("stan");
    let order = app.buy(&token, &sale, "std-1", 1).await;

    for (path, body) in [
        (format!("/v1/orders/{order}/pay"), r#"{"amount_cents": 1}"#),
        (
            format!("/v1/orders/{order}/cancel"),
            r#"{"reason": "changed my mind"}"#,
        ),
        (format!("/v1/orders/{order}/cancel"), "[]"),
    ] {
        let reply = app.post_raw(&path, Some(&token), None, body).await;
        assert_error(&reply, 400, "invalid_body");
    }
    // Not JSON at all is told apart, as on every route that takes a body.
    for body in ["[", "nope", "{\"reason\": "] {
        let reply = app
            .post_raw(
                &format!("/v1/orders/{order}/cancel"),
                Some(&token),
                None,
                body,
            )
            .await;
        assert_error(&reply, 400, "malformed_json");
    }
    assert_eq!(app.order_status(&token, &order).await, "pending_payment");

    // `bearer`, lower case, is the same scheme.
    let listed = send(
        app.client
            .get(app.url("/v1/orders"))
            .header("authorization", format!("bearer {token}")),
    )
    .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    // JSON by any case, with a charset; not a type that only starts like it.
    let purchase = |content_type: &'static str, key: &'static str| {
        send(
            app.client
                .post(app.url(&format!("/v1/flash-sales/{sale}/purchase")))
                .bearer_auth(&token)
                .header("idempotency-key", key)
                .header("content-type", content_type)
                .body(r#"{"quantity": 1}"#),
        )
    };
    assert_eq!(
        purchase("Application/JSON; charset=utf-8", "std-2")
            .await
            .status,
        201
    );
    assert_error(
        &purchase("application/jsonx", "std-3").await,
        415,
        "unsupported_media_type",
    );
    // A cancel with no body, or an empty object, still works.
    let cancelled = app
        .post_raw(
            &format!("/v1/orders/{order}/cancel"),
            Some(&token),
            None,
            "{}",
        )
        .await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);

    assert_error(&app.post_product("..", 5).await, 400, "invalid_field");
}
