//! The books check: after a run, every order a shopper was told about is compared with
//! what the server says it holds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use crate::scenario::BookKind;

/// What one shopper was told by a step marked for the books.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub kind: BookKind,
    /// `None` when no answer came (timeout, connection lost).
    pub status: Option<u16>,
    pub user: Arc<str>,
    pub idempotency_key: Option<String>,
    pub order_id: Option<String>,
    pub sale_id: Option<String>,
    pub quantity: u64,
}

impl Receipt {
    pub fn from_answer(
        kind: BookKind,
        status: u16,
        user: &Arc<str>,
        idempotency_key: Option<String>,
        body: Option<&serde_json::Value>,
        order_from_path: Option<String>,
    ) -> Receipt {
        let text = |key: &str| {
            body.and_then(|b| b.get(key))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        Receipt {
            kind,
            status: Some(status),
            user: user.clone(),
            idempotency_key,
            order_id: text("order_id").or(order_from_path),
            sale_id: text("sale_id"),
            quantity: body
                .and_then(|b| b.get("quantity"))
                .and_then(|q| q.as_u64())
                .unwrap_or(0),
        }
    }

    /// A purchase that got no answer; `quantity` is the units it asked for (0 when
    /// unknown: the check then assumes the most a shopper may hold).
    pub fn unanswered(user: &Arc<str>, idempotency_key: Option<String>, quantity: u64) -> Receipt {
        Receipt {
            kind: BookKind::Purchase,
            status: None,
            user: user.clone(),
            idempotency_key,
            order_id: None,
            sale_id: None,
            quantity,
        }
    }

    fn acknowledged_purchase(&self) -> bool {
        self.kind == BookKind::Purchase
            && matches!(self.status, Some(200 | 201))
            && self.order_id.is_some()
    }
}

/// The sale the books are kept for.
#[derive(Debug, Clone)]
pub struct SaleRef {
    pub sale_id: String,
    pub quantity: u64,
    pub per_user_limit: u64,
    /// Whether this run created the sale, so nobody else bought from it.
    pub exclusive: bool,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Books {
    pub checked: bool,
    pub ok: bool,
    pub sale_id: Option<String>,
    pub acknowledged_orders: u64,
    pub acknowledged_units: u64,
    pub paid_orders: u64,
    /// Purchases that got no answer: the server may or may not have recorded them.
    pub unanswered_purchases: u64,
    pub oversold_units: u64,
    /// Acknowledged orders the server does not know (lost acknowledged orders).
    pub unknown_orders: u64,
    /// Acknowledged orders whose lookup failed (the check is then incomplete).
    #[serde(default)]
    pub unchecked_orders: u64,
    /// The same order under two idempotency keys, or one key answered with two orders.
    pub duplicates: u64,
    pub users_over_limit: u64,
    /// The server's audit, as it answered.
    pub audit: Option<serde_json::Value>,
    pub details: Vec<String>,
}

impl Books {
    pub fn not_checked(reason: &str) -> Books {
        Books {
            details: vec![reason.to_owned()],
            ..Books::default()
        }
    }
}

/// What the checker needs from the server; the real one speaks HTTP.
pub trait Ledger {
    /// The sale's audit: `{quantity, remaining, pending_payment, paid, cancelled, expired, consistent}`.
    fn audit(&self, sale_id: &str) -> impl Future<Output = anyhow::Result<serde_json::Value>>;
    /// The order as the server holds it, or `None` when it answers 404.
    fn order(
        &self,
        order_id: &str,
    ) -> impl Future<Output = anyhow::Result<Option<serde_json::Value>>>;
    /// How many times the server has refused the checker so far (429/503, each retried
    /// after the wait it asked for). The lookups narrow their window when it grows.
    fn refusals(&self) -> u64 {
        0
    }
}

/// The lookups of the orders go out in rounds of `window` at once. A guarded server's
/// in-flight bound covers the checker too: a fixed 32 at once against a bound of 18 had
/// most of every round refused, each refusal answered late by the server's hold on
/// that connection, and 25,000 orders took hours to check. So a round the server
/// refused `r` lookups of sets the window, and its ceiling for the rest of the check, to
/// `r` fewer (at least one): what the server took at once. A round taken whole widens
/// it by one, up to the ceiling. (Halving on a refusal and growing back to the most
/// asked met the bound again every few rounds, and each time waited out a
/// `Retry-After`: ~100 lookups a second.)
struct Window {
    now: usize,
    max: usize,
}

impl Window {
    fn new(max: usize) -> Window {
        let max = max.max(1);
        Window { now: max, max }
    }

    fn after_round(&mut self, refused: u64) {
        if refused > 0 {
            let refused = usize::try_from(refused).unwrap_or(usize::MAX);
            self.now = self.now.saturating_sub(refused).max(1);
            self.max = self.now;
        } else {
            self.now = (self.now + 1).min(self.max);
        }
    }
}

/// Checks receipts against the server's books. `dropped` is how many receipts were not
/// kept (the bound was reached): then the check cannot be complete and fails.
pub async fn check<L: Ledger>(
    ledger: &L,
    sale: &SaleRef,
    receipts: &[Receipt],
    dropped: u64,
    max_lookups_in_flight: usize,
) -> Books {
    let mut books = Books {
        checked: true,
        sale_id: Some(sale.sale_id.clone()),
        ..Books::default()
    };
    if dropped > 0 {
        books.details.push(format!(
            "{dropped} receipts were not kept (bound reached); the check is incomplete"
        ));
    }

    // A purchase answered 2xx must say which order and how many units: one that does
    // not cannot be looked up or counted, so it would pass for nothing sold.
    let mut unreadable = 0u64;
    for r in receipts.iter().filter(|r| {
        r.kind == BookKind::Purchase
            && matches!(r.status, Some(200 | 201))
            && (r.order_id.is_none() || r.quantity == 0)
    }) {
        unreadable += 1;
        if unreadable <= 3 {
            books.details.push(format!(
                "a purchase was answered {} without an order id and a quantity (key {:?})",
                r.status.unwrap_or_default(),
                r.idempotency_key
            ));
        }
    }
    if unreadable > 3 {
        books.details.push(format!(
            "{unreadable} purchases in all were answered without an order id and a quantity"
        ));
    }

    // Orders the shoppers were told about, by id.
    let mut orders: BTreeMap<&str, &Receipt> = BTreeMap::new();
    let mut by_key: HashMap<&str, &str> = HashMap::new();
    for r in receipts.iter().filter(|r| r.acknowledged_purchase()) {
        let id = r.order_id.as_deref().expect("acknowledged has an id");
        if let Some(key) = r.idempotency_key.as_deref() {
            match by_key.get(key) {
                Some(other) if *other != id => {
                    books.duplicates += 1;
                    books.details.push(format!(
                        "idempotency key {key} was answered with {other} and {id}"
                    ));
                }
                _ => {
                    by_key.insert(key, id);
                }
            }
        }
        match orders.get(id) {
            Some(first) if first.idempotency_key != r.idempotency_key => {
                books.duplicates += 1;
                books.details.push(format!(
                    "order {id} was acknowledged under two idempotency keys ({:?} and {:?})",
                    first.idempotency_key, r.idempotency_key
                ));
            }
            Some(_) => {} // a replay of the same key: the same order, as it should be
            None => {
                orders.insert(id, r);
            }
        }
        if let Some(other_sale) = r.sale_id.as_deref()
            && other_sale != sale.sale_id
        {
            books.details.push(format!(
                "order {id} names sale {other_sale}, not {}",
                sale.sale_id
            ));
            books.duplicates += 1;
        }
    }
    // What the unanswered purchases could have bought between them, had they all landed.
    let mut unanswered_units = 0u64;
    for r in receipts
        .iter()
        .filter(|r| r.kind == BookKind::Purchase && r.status.is_none())
    {
        books.unanswered_purchases += 1;
        unanswered_units += match r.quantity {
            0 => sale.per_user_limit,
            asked => asked.min(sale.per_user_limit),
        };
    }
    books.acknowledged_orders = orders.len() as u64;
    books.acknowledged_units = orders.values().map(|r| r.quantity).sum();
    if books.acknowledged_units > sale.quantity {
        books.oversold_units = books.acknowledged_units - sale.quantity;
        books.details.push(format!(
            "shoppers were acknowledged {} units of a sale of {}",
            books.acknowledged_units, sale.quantity
        ));
    }
    let mut per_user: HashMap<&str, u64> = HashMap::new();
    for r in orders.values() {
        *per_user.entry(&r.user).or_default() += r.quantity;
    }
    for (user, units) in &per_user {
        if *units > sale.per_user_limit {
            books.users_over_limit += 1;
            if books.users_over_limit <= 10 {
                books.details.push(format!(
                    "shopper {user} holds {units} units, over the limit of {}",
                    sale.per_user_limit
                ));
            }
        }
    }
    let paid: HashSet<&str> = receipts
        .iter()
        .filter(|r| r.kind == BookKind::Pay && r.status == Some(200))
        .filter_map(|r| r.order_id.as_deref())
        .collect();
    books.paid_orders = paid.len() as u64;

    // The server's own count.
    match ledger.audit(&sale.sale_id).await {
        Err(e) => books.details.push(format!("audit failed: {e:#}")),
        Ok(audit) => {
            let n = |k: &str| audit.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            let held = n("pending_payment") + n("paid");
            let recorded = held + n("cancelled") + n("expired");
            if audit.get("consistent").and_then(|v| v.as_bool()) != Some(true) {
                books
                    .details
                    .push("the server's audit says inconsistent".into());
            }
            // Counted here too, not taken on the server's word: every unit is either
            // still for sale or held by an order.
            if n("remaining") + held != n("quantity") {
                books.details.push(format!(
                    "the audit's units do not add up: {} remaining + {held} held (pending or paid) against a quantity of {}",
                    n("remaining"),
                    n("quantity")
                ));
            }
            if held > sale.quantity {
                books.oversold_units = books.oversold_units.max(held - sale.quantity);
                books.details.push(format!(
                    "the server holds {held} units of a sale of {}",
                    sale.quantity
                ));
            }
            if n("quantity") != sale.quantity {
                books.details.push(format!(
                    "the audit counts a quantity of {}, the sale was made with {}",
                    n("quantity"),
                    sale.quantity
                ));
            }
            if sale.exclusive {
                if recorded < books.acknowledged_units {
                    books.details.push(format!(
                        "shoppers were acknowledged {} units but the server recorded {recorded}",
                        books.acknowledged_units
                    ));
                } else if recorded > books.acknowledged_units + unanswered_units {
                    books.details.push(format!(
                        "the server recorded {recorded} units but acknowledged only {}, and the {} unanswered purchases could account for at most {unanswered_units} more",
                        books.acknowledged_units, books.unanswered_purchases
                    ));
                }
            }
            books.audit = Some(audit);
        }
    }

    // Every acknowledged order, looked up one by one, as many at once as the server takes.
    let ids: Vec<&str> = orders.keys().copied().collect();
    let mut window = Window::new(max_lookups_in_flight);
    let mut rest = &ids[..];
    while !rest.is_empty() {
        let (round, after) = rest.split_at(window.now.min(rest.len()));
        rest = after;
        let refusals_before = ledger.refusals();
        let lookups = round
            .iter()
            .map(|id| async move { (*id, ledger.order(id).await) });
        let answers = futures::future::join_all(lookups).await;
        window.after_round(ledger.refusals().saturating_sub(refusals_before));
        for (id, found) in answers {
            let mine = orders[id];
            match found {
                Err(e) => {
                    // Not lost: not known either way. The check is incomplete and fails.
                    books.unchecked_orders += 1;
                    if books.unchecked_orders <= 10 {
                        books
                            .details
                            .push(format!("order {id}: lookup failed: {e:#}"));
                    }
                }
                Ok(None) => {
                    books.unknown_orders += 1;
                    if books.unknown_orders <= 10 {
                        books
                            .details
                            .push(format!("acknowledged order {id} is unknown to the server"));
                    }
                }
                Ok(Some(order)) => {
                    let quantity = order.get("quantity").and_then(|q| q.as_u64());
                    if quantity != Some(mine.quantity) {
                        books.details.push(format!(
                            "order {id}: acknowledged {} units, the server holds {quantity:?}",
                            mine.quantity
                        ));
                    }
                    let status = order.get("status").and_then(|s| s.as_str()).unwrap_or("");
                    if paid.contains(id) && status != "paid" {
                        books
                            .details
                            .push(format!("order {id} was paid but the server says {status}"));
                    }
                }
            }
        }
    }

    if books.unchecked_orders > 10 {
        books.details.push(format!(
            "{} acknowledged orders could not be looked up in all",
            books.unchecked_orders
        ));
    }
    books.ok = books.details.is_empty();
    books
}

/// The server's books over HTTP, with the admin token.
pub struct HttpLedger {
    client: reqwest::Client,
    base: String,
    admin_token: String,
    /// Refusals met so far ([`Ledger::refusals`]).
    refused: std::sync::atomic::AtomicU64,
}

impl HttpLedger {
    /// The books of the server at `base` (no trailing slash), read with `admin_token`.
    pub fn new(client: reqwest::Client, base: String, admin_token: String) -> HttpLedger {
        HttpLedger {
            client,
            base,
            admin_token,
            refused: Default::default(),
        }
    }

    /// GET with the admin token. A guarded server may refuse the checker too (429/503
    /// with `Retry-After`, e.g. right after the storm it was measured under): wait as
    /// asked and try again, a bounded number of times. The whole wait: a request sent
    /// sooner on that connection would meet the server's hold for the rest of it.
    async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        const ATTEMPTS: u32 = 30;
        for attempt in 1..=ATTEMPTS {
            let response = self
                .client
                .get(format!("{}{path}", self.base))
                .bearer_auth(&self.admin_token)
                .send()
                .await?;
            let refused = matches!(response.status().as_u16(), 429 | 503);
            if !refused || attempt == ATTEMPTS {
                return Ok(response);
            }
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let wait = crate::runner::retry_after(response.headers())
                .unwrap_or(std::time::Duration::from_millis(200));
            tokio::time::sleep(wait).await;
        }
        unreachable!("the last attempt returns")
    }
}

impl Ledger for HttpLedger {
    async fn audit(&self, sale_id: &str) -> anyhow::Result<serde_json::Value> {
        let response = self
            .get(&format!("/v1/flash-sales/{sale_id}/audit"))
            .await?;
        let status = response.status();
        anyhow::ensure!(
            status.is_success(),
            "audit answered {status}: {}",
            response.text().await?
        );
        Ok(response.json().await?)
    }

    async fn order(&self, order_id: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let response = self.get(&format!("/v1/orders/{order_id}")).await?;
        match response.status().as_u16() {
            404 => Ok(None),
            200 => Ok(Some(response.json().await?)),
            other => anyhow::bail!("order lookup answered {other}: {}", response.text().await?),
        }
    }

    fn refusals(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeLedger {
        audit: serde_json::Value,
        orders: HashMap<String, serde_json::Value>,
        /// Order lookups fail (the server refused or timed out).
        lookups_fail: bool,
    }

    impl Ledger for FakeLedger {
        async fn audit(&self, _: &str) -> anyhow::Result<serde_json::Value> {
            Ok(self.audit.clone())
        }
        async fn order(&self, id: &str) -> anyhow::Result<Option<serde_json::Value>> {
            anyhow::ensure!(!self.lookups_fail, "order lookup answered 503");
            Ok(self.orders.get(id).cloned())
        }
    }

    fn purchase(user: &str, key: &str, order: &str) -> Receipt {
        let body = serde_json::json!({"order_id": order, "sale_id": "sale_1", "quantity": 1});
        Receipt::from_answer(
            BookKind::Purchase,
            201,
            &Arc::from(user),
            Some(key.into()),
            Some(&body),
            None,
        )
    }

    fn sale(quantity: u64) -> SaleRef {
        SaleRef {
            sale_id: "sale_1".into(),
            quantity,
            per_user_limit: 1,
            exclusive: true,
        }
    }

    fn ledger(orders: &[&str], paid: u64) -> FakeLedger {
        FakeLedger {
            audit: serde_json::json!({"quantity": 2, "remaining": 2u64.saturating_sub(orders.len() as u64), "pending_payment": orders.len() as u64 - paid, "paid": paid, "cancelled": 0, "expired": 0, "consistent": true}),
            orders: orders
                .iter()
                .map(|id| (id.to_string(), serde_json::json!({"order_id": id, "quantity": 1, "status": if paid > 0 {"paid"} else {"pending_payment"}})))
                .collect(),
            lookups_fail: false,
        }
    }

    #[tokio::test]
    async fn matching_books_pass() {
        let receipts = vec![purchase("a", "k1", "o1"), purchase("b", "k2", "o2")];
        let books = check(&ledger(&["o1", "o2"], 0), &sale(2), &receipts, 0, 8).await;
        assert!(books.ok, "{books:?}");
        assert_eq!(books.acknowledged_units, 2);
    }

    /// A 201 that names no order, or no units, is a failure: before, it was skipped, and
    /// a server that acknowledged purchases without recording them passed.
    #[tokio::test]
    async fn a_purchase_acknowledged_without_an_order_or_a_quantity_fails() {
        let no_order = Receipt::from_answer(
            BookKind::Purchase,
            201,
            &Arc::from("a"),
            Some("k1".into()),
            Some(&serde_json::json!({"sale_id": "sale_1", "quantity": 1})),
            None,
        );
        let books = check(&ledger(&[], 0), &sale(2), &[no_order], 0, 8).await;
        assert!(!books.ok, "{books:?}");
        let no_quantity = Receipt::from_answer(
            BookKind::Purchase,
            201,
            &Arc::from("a"),
            Some("k1".into()),
            Some(&serde_json::json!({"order_id": "o1", "sale_id": "sale_1"})),
            None,
        );
        let books = check(&ledger(&["o1"], 0), &sale(2), &[no_quantity], 0, 8).await;
        assert!(!books.ok, "{books:?}");
    }

    #[tokio::test]
    async fn an_acknowledged_order_the_server_lost_fails() {
        let receipts = vec![purchase("a", "k1", "o1"), purchase("b", "k2", "o2")];
        let books = check(&ledger(&["o1"], 0), &sale(2), &receipts, 0, 8).await;
        assert!(!books.ok);
        assert_eq!(books.unknown_orders, 1);
    }

    #[tokio::test]
    async fn overselling_fails() {
        let receipts = vec![
            purchase("a", "k1", "o1"),
            purchase("b", "k2", "o2"),
            purchase("c", "k3", "o3"),
        ];
        let books = check(&ledger(&["o1", "o2", "o3"], 0), &sale(2), &receipts, 0, 8).await;
        assert!(!books.ok);
        assert_eq!(books.oversold_units, 1);
    }

    #[tokio::test]
    async fn duplicates_and_over_limit_fail() {
        // One order under two keys, and one shopper with two orders over a limit of 1.
        let receipts = vec![purchase("a", "k1", "o1"), purchase("b", "k2", "o1")];
        let books = check(&ledger(&["o1"], 0), &sale(2), &receipts, 0, 8).await;
        assert_eq!(books.duplicates, 1);
        assert!(!books.ok);
        let receipts = vec![purchase("a", "k1", "o1"), purchase("a", "k2", "o2")];
        let books = check(&ledger(&["o1", "o2"], 0), &sale(2), &receipts, 0, 8).await;
        assert_eq!(books.users_over_limit, 1);
        assert!(!books.ok);
    }

    #[tokio::test]
    async fn replays_of_one_key_are_one_order() {
        let mut replay = purchase("a", "k1", "o1");
        replay.status = Some(200);
        let receipts = vec![purchase("a", "k1", "o1"), replay];
        let books = check(&ledger(&["o1"], 0), &sale(2), &receipts, 0, 8).await;
        assert_eq!(books.acknowledged_orders, 1);
        assert_eq!(books.duplicates, 0);
    }

    #[tokio::test]
    async fn an_incomplete_record_cannot_pass() {
        let receipts = vec![purchase("a", "k1", "o1")];
        let books = check(&ledger(&["o1"], 0), &sale(2), &receipts, 5, 8).await;
        assert!(!books.ok);
    }

    #[tokio::test]
    async fn units_that_do_not_add_up_fail_whatever_the_server_calls_them() {
        // Two acknowledged orders of a sale of 5, and the audit says 0 remain: 3 units
        // leaked, though the server calls its books consistent.
        let receipts = vec![purchase("a", "k1", "o1"), purchase("b", "k2", "o2")];
        let mut leaky = ledger(&["o1", "o2"], 0);
        leaky.audit = serde_json::json!({"quantity": 5, "remaining": 0, "pending_payment": 2, "paid": 0, "cancelled": 0, "expired": 0, "consistent": true});
        let books = check(&leaky, &sale(5), &receipts, 0, 8).await;
        assert!(!books.ok, "{books:?}");
        assert!(
            books.details.iter().any(|d| d.contains("do not add up")),
            "{books:?}"
        );
    }

    #[tokio::test]
    async fn unanswered_purchases_excuse_only_the_units_they_asked_for() {
        // Two acknowledged, one unanswered purchase of 1 unit: the server may hold 3
        // units, not 4.
        let mut receipts = vec![purchase("a", "k1", "o1"), purchase("b", "k2", "o2")];
        receipts.push(Receipt::unanswered(&Arc::from("c"), Some("k3".into()), 1));
        let mut sale = sale(10);
        sale.per_user_limit = 5;
        let audit = |held: u64| {
            let mut ledger = ledger(&["o1", "o2"], 0);
            ledger.audit = serde_json::json!({"quantity": 10, "remaining": 10 - held, "pending_payment": held, "paid": 0, "cancelled": 0, "expired": 0, "consistent": true});
            ledger
        };
        let books = check(&audit(3), &sale, &receipts, 0, 8).await;
        assert!(books.ok, "{books:?}");
        let books = check(&audit(4), &sale, &receipts, 0, 8).await;
        assert!(!books.ok, "{books:?}");
        // Without the units it asked for, as many as a shopper may hold (5).
        receipts[2].quantity = 0;
        assert!(check(&audit(7), &sale, &receipts, 0, 8).await.ok);
        assert!(!check(&audit(8), &sale, &receipts, 0, 8).await.ok);
    }

    /// A server that takes at most `bound` lookups at once and refuses the rest, each
    /// refused lookup answered after a retry as `HttpLedger` does.
    struct BoundedLedger {
        inner: FakeLedger,
        bound: usize,
        in_flight: std::cell::Cell<usize>,
        most_in_flight: std::cell::Cell<usize>,
        refused: std::cell::Cell<u64>,
    }

    impl Ledger for BoundedLedger {
        async fn audit(&self, id: &str) -> anyhow::Result<serde_json::Value> {
            self.inner.audit(id).await
        }
        async fn order(&self, id: &str) -> anyhow::Result<Option<serde_json::Value>> {
            // Every lookup of the round is out before any is answered.
            self.in_flight.set(self.in_flight.get() + 1);
            tokio::task::yield_now().await;
            let now = self.in_flight.get();
            self.most_in_flight.set(self.most_in_flight.get().max(now));
            if now > self.bound {
                self.refused.set(self.refused.get() + 1);
            }
            self.in_flight.set(now - 1);
            self.inner.order(id).await
        }
        fn refusals(&self) -> u64 {
            self.refused.get()
        }
    }

    #[tokio::test]
    async fn lookups_narrow_to_what_a_guarded_server_takes() {
        let ids: Vec<String> = (0..2_000).map(|i| format!("o{i}")).collect();
        let receipts: Vec<Receipt> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| purchase(&format!("u{i}"), &format!("k{i}"), id))
            .collect();
        let mut inner = ledger(&[], 0);
        inner.audit = serde_json::json!({"quantity": 2_000, "remaining": 0, "pending_payment": 2_000, "paid": 0, "cancelled": 0, "expired": 0, "consistent": true});
        inner.orders = ids
            .iter()
            .map(|id| {
                (
                    id.clone(),
                    serde_json::json!({"order_id": id, "quantity": 1, "status": "pending_payment"}),
                )
            })
            .collect();
        let server = BoundedLedger {
            inner,
            bound: 8,
            in_flight: Default::default(),
            most_in_flight: Default::default(),
            refused: Default::default(),
        };
        let books = check(&server, &sale(2_000), &receipts, 0, 32).await;
        assert!(books.ok, "{books:?}");
        assert_eq!(
            server.most_in_flight.get(),
            32,
            "the first round asks the most"
        );
        // Rounds of 32 throughout would be refused 24 times each: 1,500 refusals. The
        // first round's refusals set the window to what the server took.
        assert_eq!(server.refused.get(), 24, "refusals");
    }

    #[tokio::test]
    async fn failed_lookups_are_unchecked_not_lost() {
        let receipts = vec![purchase("a", "k1", "o1")];
        let mut refusing = ledger(&["o1"], 0);
        refusing.lookups_fail = true;
        let books = check(&refusing, &sale(2), &receipts, 0, 8).await;
        assert!(!books.ok, "an incomplete check does not pass");
        assert_eq!((books.unknown_orders, books.unchecked_orders), (0, 1));
    }
}
