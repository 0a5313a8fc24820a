//! The conventional flash-sale stock gate: each sale's stock and its shoppers' counts in
//! Redis, checked and taken by one Lua script per purchase (`stock_gate = "redis"`).
//! Orders still go through the engine's group-commit writer to the database, the
//! durable log. Offered to compare with the in-memory gate; see `stampede_engine::StockGate`
//! for what it gives up.
//!
//! Keys: `<prefix>:sale:<id>:stock` (units left) and `<prefix>:sale:<id>:held` (a hash of
//! units per shopper).

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use stampede_engine::{GateRefusal, StockGate};
use stampede_types::{SaleId, UserId};

/// Takes `ARGV[2]` units for shopper `ARGV[1]` if the stock and the limit `ARGV[3]`
/// allow. Answers the units left, -1 when sold out (then `left` as a second value), -2
/// over the limit (then what the shopper holds), -3 for a sale the gate does not know.
const TAKE: &str = r"
local left = redis.call('GET', KEYS[1])
if not left then return {-3, 0} end
left = tonumber(left)
local n = tonumber(ARGV[2])
local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if held + n > tonumber(ARGV[3]) then return {-2, held} end
if left < n then return {-1, left} end
redis.call('DECRBY', KEYS[1], n)
redis.call('HINCRBY', KEYS[2], ARGV[1], n)
return {left - n, 0}
";

/// Hands `ARGV[2]` units of shopper `ARGV[1]` back.
const GIVE_BACK: &str = r"
if not redis.call('GET', KEYS[1]) then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[2])
local held = redis.call('HINCRBY', KEYS[2], ARGV[1], -tonumber(ARGV[2]))
if held <= 0 then redis.call('HDEL', KEYS[2], ARGV[1]) end
return 1
";

pub struct RedisGate {
    connection: ConnectionManager,
    prefix: String,
    take: redis::Script,
    give_back: redis::Script,
}

fn unavailable(error: impl std::fmt::Display) -> GateRefusal {
    GateRefusal::Unavailable(error.to_string())
}

impl RedisGate {
    /// Connects to Redis at `url` (`redis://host:6379/0`); keys start with `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisGate, GateRefusal> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let connection = ConnectionManager::new(client).await.map_err(unavailable)?;
        Ok(RedisGate {
            connection,
            prefix: prefix.to_owned(),
            take: redis::Script::new(TAKE),
            give_back: redis::Script::new(GIVE_BACK),
        })
    }

    fn keys(&self, sale: SaleId) -> (String, String) {
        (
            format!("{}:sale:{sale}:stock", self.prefix),
            format!("{}:sale:{sale}:held", self.prefix),
        )
    }
}

#[async_trait]
impl StockGate for RedisGate {
    async fn load(
        &self,
        sale: SaleId,
        remaining: u64,
        held: &[(UserId, u32)],
    ) -> Result<(), GateRefusal> {
        let (stock, holders) = self.keys(sale);
        let mut pipe = redis::pipe();
        pipe.atomic().del(&holders).ignore();
        for chunk in held.chunks(1_000) {
            let pairs: Vec<(&str, u32)> = chunk.iter().map(|(u, n)| (u.as_str(), *n)).collect();
            pipe.hset_multiple(&holders, &pairs).ignore();
        }
        pipe.set(&stock, remaining).ignore();
        let mut connection = self.connection.clone();
        pipe.query_async::<()>(&mut connection)
            .await
            .map_err(unavailable)
    }

    async fn take(
        &self,
        sale: SaleId,
        user: &UserId,
        units: u32,
        limit: u32,
    ) -> Result<u64, GateRefusal> {
        let (stock, holders) = self.keys(sale);
        let mut connection = self.connection.clone();
        let (answer, detail): (i64, i64) = self
            .take
            .key(stock)
            .key(holders)
            .arg(user.as_str())
            .arg(units)
            .arg(limit)
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        match answer {
            -1 => Err(GateRefusal::SoldOut {
                remaining: detail.max(0) as u64,
            }),
            -2 => Err(GateRefusal::LimitExceeded {
                held: detail.clamp(0, i64::from(u32::MAX)) as u32,
            }),
            -3 => Err(GateRefusal::Unavailable(format!(
                "the stock gate does not know sale {sale}"
            ))),
            left => Ok(left.max(0) as u64),
        }
    }

    async fn give_back(&self, sale: SaleId, user: &UserId, units: u32) -> Result<(), GateRefusal> {
        let (stock, holders) = self.keys(sale);
        let mut connection = self.connection.clone();
        let _: i64 = self
            .give_back
            .key(stock)
            .key(holders)
            .arg(user.as_str())
            .arg(units)
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn remaining(&self, sale: SaleId) -> Result<u64, GateRefusal> {
        let (stock, _) = self.keys(sale);
        let mut connection = self.connection.clone();
        let left: Option<i64> = redis::cmd("GET")
            .arg(stock)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        Ok(left.unwrap_or(0).max(0) as u64)
    }
}
