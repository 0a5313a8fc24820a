//! Decoding rows into records, shared by every backend: the same columns, the same
//! checks, whatever the driver (the macros expand against each driver's row type).
//! A value that does not parse is `StoreError::Corrupt`, never a panic. Also the order
//! columns, in the order every backend inserts them.

use stampede_engine::{OpOutcome, SaleTally, StoreError};
use stampede_types::{Cents, OrderStatus};

pub(crate) fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

/// Whether a charge-ledger entry (`WriteOp::ChargeAttempt`, or with `owed`
/// `WriteOp::ChargeOwed`) is written for an order in state `current` (`None`: no such
/// order): `None` when it is, else the outcome that refuses it. An attempt only for a
/// pending order; a refund owed for any order but a paid one.
pub(crate) fn charge_refusal(owed: bool, current: Option<OrderStatus>) -> Option<OpOutcome> {
    match current {
        None => Some(OpOutcome::NotFound),
        Some(OrderStatus::PendingPayment) => None,
        Some(current) if owed && current != OrderStatus::Paid => None,
        Some(current) => Some(OpOutcome::Refused { current }),
    }
}

pub(crate) fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Corrupt(format!("{what}: {value:?}"))
}

/// Adds one `(status, SUM(quantity))` row of a tally query.
pub(crate) fn count_units(
    tally: &mut SaleTally,
    status: &str,
    units: i64,
) -> Result<(), StoreError> {
    let units = u64::try_from(units).map_err(|_| corrupt("units", &units.to_string()))?;
    match OrderStatus::parse(status).ok_or_else(|| corrupt("status", status))? {
        OrderStatus::PendingPayment => tally.pending_payment = units,
        OrderStatus::Paid => tally.paid = units,
        OrderStatus::Cancelled => tally.cancelled = units,
        OrderStatus::Expired => tally.expired = units,
    }
    Ok(())
}

/// An order's values in the column order of `order_columns!`: what the MySQL protocol's
/// insert carries as a JSON array per row. The embedded store binds the same values
/// itself (`sqlite_writer::bind_order`).
pub(crate) type OrderValues<'a> = (
    String,
    &'a str,
    String,
    &'a str,
    i64,
    i64,
    &'static str,
    &'a str,
    i64,
    i64,
    i64,
);

pub(crate) fn order_values(order: &stampede_engine::OrderRecord) -> OrderValues<'_> {
    (
        order.id.to_string(),
        order.user_id.as_str(),
        order.sale_id.to_string(),
        order.sku.as_str(),
        i64::from(order.quantity.get()),
        order.amount.get(),
        order.status.as_str(),
        order.idempotency_key.as_str(),
        order.created_at_ms,
        order.expires_at_ms,
        order.updated_at_ms,
    )
}

/// The outcome of a transition that moved an order, from the order's stored columns.
pub(crate) fn transitioned(
    sale_id: &str,
    user_id: &str,
    quantity: i64,
    charge_cents: Option<i64>,
) -> Result<stampede_engine::OpOutcome, StoreError> {
    use stampede_types::{Quantity, SaleId, UserId};
    Ok(stampede_engine::OpOutcome::Transitioned {
        sale_id: SaleId::parse(sale_id).ok_or_else(|| corrupt("sale id", sale_id))?,
        user_id: UserId::parse(user_id).map_err(|_| corrupt("user id", user_id))?,
        quantity: Quantity::parse(quantity).map_err(|e| corrupt("quantity", &e.to_string()))?,
        charge: charge_cents
            .map(|cents| {
                Cents::parse_amount("amount_cents", cents)
                    .map_err(|e| corrupt("charge amount", &e.to_string()))
            })
            .transpose()?,
    })
}

macro_rules! order_columns {
    () => {
        "id, user_id, sale_id, sku, quantity, amount_cents, status, idempotency_key, \
         created_at_ms, expires_at_ms, updated_at_ms"
    };
}

macro_rules! order_from_row {
    ($row:expr) => {{
        let row = $row;
        (|| -> Result<OrderRecord, StoreError> {
            let text = |name: &str| -> Result<String, StoreError> {
                row.try_get::<String, _>(name).map_err(unavailable)
            };
            let int = |name: &str| -> Result<i64, StoreError> {
                row.try_get::<i64, _>(name).map_err(unavailable)
            };
            let id = text("id")?;
            let sale_id = text("sale_id")?;
            let status = text("status")?;
            let user_id = text("user_id")?;
            let sku = text("sku")?;
            let key = text("idempotency_key")?;
            Ok(OrderRecord {
                id: OrderId::parse(&id).ok_or_else(|| corrupt("order id", &id))?,
                user_id: UserId::parse(&user_id).map_err(|_| corrupt("user id", &user_id))?,
                sale_id: SaleId::parse(&sale_id).ok_or_else(|| corrupt("sale id", &sale_id))?,
                sku: Sku::parse(&sku).map_err(|_| corrupt("sku", &sku))?,
                quantity: Quantity::parse(int("quantity")?)
                    .map_err(|e| corrupt("quantity", &e.to_string()))?,
                amount: Cents::parse_amount("amount_cents", int("amount_cents")?)
                    .map_err(|e| corrupt("amount", &e.to_string()))?,
                status: OrderStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
                idempotency_key: IdempotencyKey::parse(&key)
                    .map_err(|_| corrupt("idempotency key", &key))?,
                created_at_ms: int("created_at_ms")?,
                expires_at_ms: int("expires_at_ms")?,
                updated_at_ms: int("updated_at_ms")?,
            })
        })()
    }};
}

/// The charge ledger's entries whose orders are no longer pending, with their
/// states, on `$executor`.
macro_rules! fetch_charges_to_settle {
    ($executor:expr) => {
        sqlx::query(
            "SELECT a.order_id, a.amount_cents, o.status FROM charge_attempts a \
             JOIN orders o ON o.id = a.order_id WHERE o.status <> 'pending_payment'",
        )
        .fetch_all($executor)
        .await
        .map_err(unavailable)?
        .iter()
        .map(
            |row| -> Result<stampede_engine::ChargeAttempt, StoreError> {
                let id: String = row.try_get("order_id").map_err(unavailable)?;
                let status: String = row.try_get("status").map_err(unavailable)?;
                let amount: i64 = row.try_get("amount_cents").map_err(unavailable)?;
                Ok(stampede_engine::ChargeAttempt {
                    order_id: OrderId::parse(&id).ok_or_else(|| corrupt("order id", &id))?,
                    amount: Cents::parse_amount("amount_cents", amount)
                        .map_err(|e| corrupt("amount", &e.to_string()))?,
                    status: OrderStatus::parse(&status)
                        .ok_or_else(|| corrupt("status", &status))?,
                })
            },
        )
        .collect::<Result<Vec<_>, StoreError>>()
    };
}

/// Every product, by sku, on `$executor`.
macro_rules! fetch_products {
    ($executor:expr) => {
        sqlx::query(
            "SELECT sku, name, price_cents, available, created_at_ms FROM products ORDER BY sku",
        )
        .fetch_all($executor)
        .await
        .map_err(unavailable)?
        .iter()
        .map(|row| product_from_row!(row))
        .collect::<Result<Vec<_>, _>>()
    };
}

macro_rules! product_from_row {
    ($row:expr) => {{
        let row = $row;
        (|| -> Result<ProductRecord, StoreError> {
            let sku: String = row.try_get("sku").map_err(unavailable)?;
            let name: String = row.try_get("name").map_err(unavailable)?;
            let price: i64 = row.try_get("price_cents").map_err(unavailable)?;
            let available: i64 = row.try_get("available").map_err(unavailable)?;
            Ok(ProductRecord {
                sku: Sku::parse(&sku).map_err(|_| corrupt("sku", &sku))?,
                name: Arc::from(name),
                price: Cents::parse("price_cents", price)
                    .map_err(|e| corrupt("price", &e.to_string()))?,
                available: u64::try_from(available)
                    .map_err(|_| corrupt("available", &available.to_string()))?,
                created_at_ms: row.try_get("created_at_ms").map_err(unavailable)?,
            })
        })()
    }};
}

macro_rules! sale_from_row {
    ($row:expr) => {{
        let row = $row;
        (|| -> Result<SaleRecord, StoreError> {
            let id: String = row.try_get("id").map_err(unavailable)?;
            let sku: String = row.try_get("sku").map_err(unavailable)?;
            let price: i64 = row.try_get("price_cents").map_err(unavailable)?;
            let quantity: i64 = row.try_get("quantity").map_err(unavailable)?;
            let limit: i64 = row.try_get("per_user_limit").map_err(unavailable)?;
            Ok(SaleRecord {
                id: SaleId::parse(&id).ok_or_else(|| corrupt("sale id", &id))?,
                sku: Sku::parse(&sku).map_err(|_| corrupt("sku", &sku))?,
                price: Cents::parse("price_cents", price)
                    .map_err(|e| corrupt("price", &e.to_string()))?,
                quantity: u64::try_from(quantity)
                    .map_err(|_| corrupt("quantity", &quantity.to_string()))?,
                per_user_limit: u32::try_from(limit)
                    .map_err(|_| corrupt("per_user_limit", &limit.to_string()))?,
                starts_at_ms: row.try_get("starts_at_ms").map_err(unavailable)?,
                ends_at_ms: row.try_get("ends_at_ms").map_err(unavailable)?,
                created_at_ms: row.try_get("created_at_ms").map_err(unavailable)?,
            })
        })()
    }};
}

/// The outbox rows a committed batch produces: the inserted orders (their event is
/// `pending_payment`, "created") and the transitions that were applied.
pub(crate) fn outbox_events(
    ops: &[stampede_engine::WriteOp],
    outcomes: &[stampede_engine::OpOutcome],
) -> Vec<(stampede_types::OrderId, &'static str, i64)> {
    use stampede_engine::{OpOutcome, WriteOp};
    ops.iter()
        .zip(outcomes)
        .filter_map(|(op, outcome)| match (op, outcome) {
            (WriteOp::InsertOrder(order), OpOutcome::Written) => {
                Some((order.id, order.status.as_str(), order.created_at_ms))
            }
            (
                WriteOp::Transition {
                    order_id,
                    to,
                    at_ms,
                },
                OpOutcome::Transitioned { .. },
            ) => Some((*order_id, to.as_str(), *at_ms)),
            _ => None,
        })
        .collect()
}

/// Inserts `outbox_events` in the open transaction `$conn`, 1,024 rows per statement.
macro_rules! insert_outbox {
    ($conn:expr, $db:ty, $events:expr) => {
        for chunk in $events.chunks(1024) {
            let mut query: QueryBuilder<$db> =
                QueryBuilder::new("INSERT INTO outbox (order_id, event, at_ms) ");
            query.push_values(chunk, |mut row, (order_id, event, at_ms)| {
                row.push_bind(order_id.to_string())
                    .push_bind(*event)
                    .push_bind(*at_ms);
            });
            query
                .build()
                .execute(&mut *$conn)
                .await
                .map_err(unavailable)?;
        }
    };
}

/// Reads the oldest `$limit` outbox events with their orders, on `$executor`.
macro_rules! read_outbox {
    ($executor:expr, $db:ty, $limit:expr) => {{
        let mut query: QueryBuilder<$db> = QueryBuilder::new(concat!(
            "SELECT seq, event, at_ms, ",
            order_columns!(),
            " FROM outbox JOIN orders ON orders.id = outbox.order_id ORDER BY seq LIMIT "
        ));
        query.push_bind($limit as i64);
        let rows = query
            .build()
            .fetch_all($executor)
            .await
            .map_err(unavailable)?;
        rows.iter()
            .map(|row| -> Result<stampede_engine::OutboxEvent, StoreError> {
                let event: String = row.try_get("event").map_err(unavailable)?;
                Ok(stampede_engine::OutboxEvent {
                    seq: row.try_get("seq").map_err(unavailable)?,
                    event: OrderStatus::parse(&event).ok_or_else(|| corrupt("event", &event))?,
                    at_ms: row.try_get("at_ms").map_err(unavailable)?,
                    order: order_from_row!(row)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()
    }};
}

/// How many outbox events one removal statement names: a relay round's default, well
/// inside every backend's limit on bound parameters.
pub(crate) const OUTBOX_REMOVE_CHUNK: usize = 1_024;

/// Removes exactly the outbox events `$seqs`, in one transaction on `$pool` (one
/// statement per `OUTBOX_REMOVE_CHUNK`). Not kept prepared: the list's length changes
/// from round to round, and every length would take a place in the connection's
/// statement cache.
macro_rules! remove_outbox {
    ($pool:expr, $db:ty, $seqs:expr) => {{
        let seqs: &[i64] = $seqs;
        let mut tx = $pool.begin().await.map_err(unavailable)?;
        for chunk in seqs.chunks($crate::rows::OUTBOX_REMOVE_CHUNK) {
            let mut query: QueryBuilder<$db> =
                QueryBuilder::new("DELETE FROM outbox WHERE seq IN (");
            let mut list = query.separated(", ");
            for seq in chunk {
                list.push_bind(*seq);
            }
            query.push(")");
            query
                .build()
                .persistent(false)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(())
    }};
}

/// The orders with these ids on `$executor` (re-evaluated per chunk of 256 ids).
macro_rules! fetch_orders {
    ($executor:expr, $db:ty, $ids:expr) => {
        async {
            let ids: &[OrderId] = $ids;
            let mut orders = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(256) {
                let mut query: QueryBuilder<$db> = QueryBuilder::new(concat!(
                    "SELECT ",
                    order_columns!(),
                    " FROM orders WHERE id IN ("
                ));
                let mut separated = query.separated(", ");
                for id in chunk {
                    separated.push_bind(id.to_string());
                }
                query.push(")");
                for row in query
                    .build()
                    .fetch_all($executor)
                    .await
                    .map_err(unavailable)?
                {
                    orders.push(order_from_row!(&row)?);
                }
            }
            Ok::<_, StoreError>(orders)
        }
        .await
    };
}
