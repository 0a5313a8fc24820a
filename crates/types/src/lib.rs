//! Domain types shared by every Stampede crate.
//!
//! **Architecture invariant:** this crate does no I/O and knows nothing of HTTP, SQL or
//! JSON framing. Values are parsed once at the edge (`Sku::parse`, `Quantity::parse`) and
//! are valid for the rest of their life.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Upper bound of units in one purchase. Large enough for any shopper, small enough that
/// `quantity * price_cents` never overflows `i64`.
pub const PURCHASE_QUANTITY_MAX: u32 = 1_000;
/// Upper bound of a product's stock or a sale's quantity.
pub const STOCK_MAX: u64 = 1_000_000_000;
/// Upper bound of a price in cents (10 million currency units).
pub const PRICE_CENTS_MAX: i64 = 1_000_000_000;
/// Length bounds of identifiers given by clients.
pub const SKU_LEN_MAX: usize = 64;
pub const NAME_LEN_MAX: usize = 200;
pub const USER_ID_LEN_MAX: usize = 128;
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidInput {
    pub field: &'static str,
    pub reason: String,
}

impl InvalidInput {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

fn check_token(field: &'static str, value: &str, len_max: usize) -> Result<(), InvalidInput> {
    if value.is_empty() {
        return Err(InvalidInput::new(field, "must not be empty"));
    }
    if value.len() > len_max {
        return Err(InvalidInput::new(
            field,
            format!("longer than {len_max} bytes"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(InvalidInput::new(
            field,
            "allowed characters are A-Z a-z 0-9 - _ . :",
        ));
    }
    Ok(())
}

/// Stock keeping unit: 1..=64 bytes of `[A-Za-z0-9-_.:]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Sku(Arc<str>);

impl Sku {
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        check_token("sku", value, SKU_LEN_MAX)?;
        // A path segment of dots alone is read as "this" or "up" by clients that
        // normalise URLs: `/v1/products/..` would never reach the product.
        if value.bytes().all(|b| b == b'.') {
            return Err(InvalidInput::new("sku", "must not be dots alone"));
        }
        Ok(Self(Arc::from(value)))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A shopper, as named by the `sub` claim of their token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId(Arc<str>);

impl UserId {
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        if value.is_empty() || value.len() > USER_ID_LEN_MAX {
            return Err(InvalidInput::new(
                "sub",
                format!("must be 1..={USER_ID_LEN_MAX} bytes"),
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(InvalidInput::new(
                "sub",
                "must not contain control characters",
            ));
        }
        Ok(Self(Arc::from(value)))
    }
    /// A shopper a token names from now on: as [`UserId::parse`], and with no
    /// whitespace at either end. MariaDB and MySQL compare `utf8mb4_bin` text with
    /// trailing spaces ignored (PAD SPACE), so `"alice"` and `"alice "` would be one
    /// shopper to the database and two to the engine: two per-user limits that the
    /// audit's count by shopper adds up, and a cluster's look-ups by shopper that
    /// answer with the other's orders. Ids already stored still load with `parse`.
    pub fn parse_sub(value: &str) -> Result<Self, InvalidInput> {
        if value.trim() != value {
            return Err(InvalidInput::new(
                "sub",
                "must not begin or end with whitespace",
            ));
        }
        Self::parse(value)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The client's `Idempotency-Key` header value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    pub fn parse(value: &str) -> Result<Self, InvalidInput> {
        if value.is_empty() || value.len() > IDEMPOTENCY_KEY_LEN_MAX {
            return Err(InvalidInput::new(
                "idempotency_key",
                format!("must be 1..={IDEMPOTENCY_KEY_LEN_MAX} bytes"),
            ));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidInput::new(
                "idempotency_key",
                "must be visible ASCII",
            ));
        }
        Ok(Self(Arc::from(value)))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Units in one purchase: 1..=PURCHASE_QUANTITY_MAX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Quantity(u32);

impl Quantity {
    pub fn parse(value: i64) -> Result<Self, InvalidInput> {
        if value < 1 {
            return Err(InvalidInput::new("quantity", "must be at least 1"));
        }
        if value > i64::from(PURCHASE_QUANTITY_MAX) {
            return Err(InvalidInput::new(
                "quantity",
                format!("must be at most {PURCHASE_QUANTITY_MAX}"),
            ));
        }
        Ok(Self(value as u32))
    }
    pub fn get(self) -> u32 {
        self.0
    }
}

/// A non-negative amount of money in integer cents, made only by its bounded parsers (so
/// no `Deserialize`, which would skip them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Cents(i64);

impl Cents {
    pub fn parse(field: &'static str, value: i64) -> Result<Self, InvalidInput> {
        if !(0..=PRICE_CENTS_MAX).contains(&value) {
            return Err(InvalidInput::new(
                field,
                format!("must be within 0..={PRICE_CENTS_MAX}"),
            ));
        }
        Ok(Self(value))
    }
    pub fn get(self) -> i64 {
        self.0
    }
    /// An order's amount: `price × quantity`, so up to `PRICE_CENTS_MAX × PURCHASE_QUANTITY_MAX`.
    pub fn parse_amount(field: &'static str, value: i64) -> Result<Self, InvalidInput> {
        let amount_cents_max = PRICE_CENTS_MAX * i64::from(PURCHASE_QUANTITY_MAX);
        if !(0..=amount_cents_max).contains(&value) {
            return Err(InvalidInput::new(
                field,
                format!("must be within 0..={amount_cents_max}"),
            ));
        }
        Ok(Self(value))
    }
    /// `price × quantity`; cannot overflow because both are bounded.
    pub fn times(self, quantity: Quantity) -> Cents {
        Cents(self.0 * i64::from(quantity.get()))
    }
}

/// Stock of a product or quantity of a sale: 0..=STOCK_MAX units.
pub fn parse_stock(field: &'static str, value: i64) -> Result<u64, InvalidInput> {
    if !(0..=STOCK_MAX as i64).contains(&value) {
        return Err(InvalidInput::new(
            field,
            format!("must be within 0..={STOCK_MAX}"),
        ));
    }
    Ok(value as u64)
}

pub fn parse_name(value: &str) -> Result<Arc<str>, InvalidInput> {
    let trimmed = value.trim();
    if trimmed.is_empty() || trimmed.len() > NAME_LEN_MAX {
        return Err(InvalidInput::new(
            "name",
            format!("must be 1..={NAME_LEN_MAX} bytes"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(InvalidInput::new(
            "name",
            "must not contain control characters",
        ));
    }
    Ok(Arc::from(trimmed))
}

/// Room for the longest id's text: a prefix of at most 8 bytes and 32 hex digits.
pub const ID_TEXT_MAX: usize = 40;

macro_rules! uuid_id {
    ($name:ident, $prefix:literal) => {
        const _: () = assert!(
            $prefix.len() + 32 <= ID_TEXT_MAX,
            "the id's text fits its buffer"
        );

        /// Time-ordered identifier (UUID v7), rendered with a type prefix.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub uuid::Uuid);

        impl $name {
            pub const PREFIX: &'static str = $prefix;
            pub fn new() -> Self {
                Self(uuid::Uuid::now_v7())
            }
            pub fn parse(value: &str) -> Option<Self> {
                let rest = value.strip_prefix($prefix)?;
                uuid::Uuid::try_parse(rest).ok().map(Self)
            }
            /// The id's text (what `Display` writes) in `buf`, without `fmt`: for
            /// answers written straight into a buffer.
            pub fn encode<'b>(&self, buf: &'b mut [u8; ID_TEXT_MAX]) -> &'b str {
                let (prefix, rest) = buf.split_at_mut($prefix.len());
                prefix.copy_from_slice($prefix.as_bytes());
                let len = $prefix.len() + self.0.simple().encode_lower(rest).len();
                std::str::from_utf8(&buf[..len]).expect("a prefix and hex digits are ASCII")
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.encode(&mut [0; ID_TEXT_MAX]))
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

uuid_id!(OrderId, "ord_");
uuid_id!(SaleId, "sale_");

/// Lifecycle of an order.
///
/// ```text
/// pending_payment ──pay──▶ paid
///        │ ├──cancel──▶ cancelled   (stock returns)
///        │ └──expire──▶ expired     (stock returns)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    PendingPayment,
    Paid,
    Cancelled,
    Expired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderEvent {
    Pay,
    Cancel,
    Expire,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::PendingPayment => "pending_payment",
            OrderStatus::Paid => "paid",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Expired => "expired",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "pending_payment" => OrderStatus::PendingPayment,
            "paid" => OrderStatus::Paid,
            "cancelled" => OrderStatus::Cancelled,
            "expired" => OrderStatus::Expired,
            _ => return None,
        })
    }

    /// Whether the order's units are still taken from the sale.
    pub fn holds_stock(self) -> bool {
        matches!(self, OrderStatus::PendingPayment | OrderStatus::Paid)
    }

    /// The state machine: the only transitions there are.
    pub fn apply(self, event: OrderEvent) -> Result<OrderStatus, OrderStatus> {
        match (self, event) {
            (OrderStatus::PendingPayment, OrderEvent::Pay) => Ok(OrderStatus::Paid),
            (OrderStatus::PendingPayment, OrderEvent::Cancel) => Ok(OrderStatus::Cancelled),
            (OrderStatus::PendingPayment, OrderEvent::Expire) => Ok(OrderStatus::Expired),
            (other, _) => Err(other),
        }
    }
}

/// What a flash sale is doing at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SaleStatus {
    Scheduled,
    Live,
    SoldOut,
    Ended,
}

impl SaleStatus {
    pub fn at(now_ms: i64, starts_at_ms: i64, ends_at_ms: i64, remaining: u64) -> Self {
        if now_ms >= ends_at_ms {
            SaleStatus::Ended
        } else if now_ms < starts_at_ms {
            SaleStatus::Scheduled
        } else if remaining == 0 {
            SaleStatus::SoldOut
        } else {
            SaleStatus::Live
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tokens_sub_has_no_whitespace_at_its_ends() {
        assert_eq!(UserId::parse_sub("alice").unwrap().as_str(), "alice");
        assert_eq!(
            UserId::parse_sub("alice smith").unwrap().as_str(),
            "alice smith"
        );
        for padded in ["alice ", " alice", "alice\u{3000}", "\u{a0}alice", " "] {
            assert!(UserId::parse_sub(padded).is_err(), "{padded:?}");
        }
        // Ids stored before still load.
        assert!(UserId::parse("alice ").is_ok());
    }

    #[test]
    fn quantity_bounds() {
        assert!(Quantity::parse(0).is_err());
        assert!(Quantity::parse(-3).is_err());
        assert!(Quantity::parse(i64::MAX).is_err());
        assert_eq!(Quantity::parse(1).unwrap().get(), 1);
        assert_eq!(Quantity::parse(1000).unwrap().get(), 1000);
        assert!(Quantity::parse(1001).is_err());
    }

    #[test]
    fn the_largest_amount_reads_back() {
        let price = Cents::parse("price_cents", PRICE_CENTS_MAX).unwrap();
        let amount = price.times(Quantity::parse(i64::from(PURCHASE_QUANTITY_MAX)).unwrap());
        assert_eq!(
            Cents::parse_amount("amount_cents", amount.get()),
            Ok(amount)
        );
        assert!(Cents::parse("price_cents", amount.get()).is_err());
    }

    #[test]
    fn sku_rules() {
        assert!(Sku::parse("").is_err());
        assert!(Sku::parse("has space").is_err());
        assert!(Sku::parse(&"x".repeat(65)).is_err());
        assert!(Sku::parse(".").is_err());
        assert!(Sku::parse("..").is_err());
        assert!(Sku::parse("...").is_err());
        assert!(Sku::parse(".5").is_ok());
        assert_eq!(
            Sku::parse("PHONE-128.blue").unwrap().as_str(),
            "PHONE-128.blue"
        );
    }

    #[test]
    fn ids_round_trip() {
        let id = OrderId::new();
        let text = id.to_string();
        assert!(text.starts_with("ord_"));
        assert_eq!(OrderId::parse(&text), Some(id));
        assert_eq!(OrderId::parse("sale_0"), None);
        assert_eq!(SaleId::parse(&text), None);
    }

    #[test]
    fn state_machine_is_one_way() {
        use OrderEvent::*;
        use OrderStatus::*;
        assert_eq!(PendingPayment.apply(Pay), Ok(Paid));
        assert_eq!(PendingPayment.apply(Cancel), Ok(Cancelled));
        assert_eq!(PendingPayment.apply(Expire), Ok(Expired));
        for terminal in [Paid, Cancelled, Expired] {
            for event in [Pay, Cancel, Expire] {
                assert_eq!(terminal.apply(event), Err(terminal));
            }
        }
    }

    #[test]
    fn sale_status_by_time() {
        assert_eq!(SaleStatus::at(0, 10, 20, 5), SaleStatus::Scheduled);
        assert_eq!(SaleStatus::at(10, 10, 20, 5), SaleStatus::Live);
        assert_eq!(SaleStatus::at(15, 10, 20, 0), SaleStatus::SoldOut);
        assert_eq!(SaleStatus::at(20, 10, 20, 5), SaleStatus::Ended);
    }
}
