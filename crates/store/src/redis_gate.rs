//! The conventional flash-sale stock gate: each sale's stock and its shoppers' counts in
//! Redis, checked and taken by one Lua script per purchase (`stock_gate = "redis"`).
//! Orders still go through the engine's group-commit writer to the database, the
//! durable log. Offered to compare with the in-memory gate; see `stampede_engine::StockGate`
//! for what it gives up.
//!
//! Keys: `<prefix>:sale:<id>:stock` (units left), `<prefix>:sale:<id>:held` (a hash of
//! units per shopper), `<prefix>:sale:<id>:epoch` (which load of the sale the other two
//! belong to) and `<prefix>:sale:<id>:seq` (how many takes and give-backs have changed
//! the stock: it orders their answers, `GateCount::seq`).
//!
//! **Fencing:** each `load` (a start reloading the sale from the durable orders, or the
//! sale's creation) moves the epoch on, and the scripts take and hand back only under
//! the epoch their process loaded. A give-back still on its way from a process that died
//! or was replaced, landing after the next process loaded the sale, would count its
//! units twice (the load already counted the order closed); it is refused instead, and so
//! is that process's take.

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use stampede_engine::{GateCount, GateRefusal, StockGate};
use stampede_types::{SaleId, UserId};

/// Takes `ARGV[2]` units for shopper `ARGV[1]` if the stock and the limit `ARGV[3]`
/// allow. Answers the units left and the stock's new operation count, -1 when sold out
/// (then `left` as a second value), -2 over the limit (then what the shopper holds), -3
/// for a sale the gate does not know, -4 when the sale was loaded again since epoch
/// `ARGV[4]`.
const TAKE: &str = r"
local left = redis.call('GET', KEYS[1])
if not left then return {-3, 0, 0} end
if redis.call('GET', KEYS[3]) ~= ARGV[4] then return {-4, 0, 0} end
left = tonumber(left)
local n = tonumber(ARGV[2])
local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if held + n > tonumber(ARGV[3]) then return {-2, held, 0} end
if left < n then return {-1, left, 0} end
redis.call('DECRBY', KEYS[1], n)
redis.call('HINCRBY', KEYS[2], ARGV[1], n)
return {left - n, 0, redis.call('INCR', KEYS[4])}
";

/// Hands `ARGV[2]` units of shopper `ARGV[1]` back; answers 1, the units left and the
/// stock's new operation count; 0 (nothing done) for a sale the gate does not know, -4
/// when the sale was loaded again since epoch `ARGV[3]`.
const GIVE_BACK: &str = r"
if not redis.call('GET', KEYS[1]) then return {0, 0, 0} end
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return {-4, 0, 0} end
local left = redis.call('INCRBY', KEYS[1], ARGV[2])
local held = redis.call('HINCRBY', KEYS[2], ARGV[1], -tonumber(ARGV[2]))
if held <= 0 then redis.call('HDEL', KEYS[2], ARGV[1]) end
return {1, left, redis.call('INCR', KEYS[4])}
";

pub struct RedisGate {
    connection: ConnectionManager,
    prefix: String,
    take: redis::Script,
    give_back: redis::Script,
    /// The epoch this process loaded each sale under (`load`).
    epochs: std::sync::RwLock<std::collections::HashMap<SaleId, i64>>,
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
            epochs: Default::default(),
        })
    }

    /// The sale's stock, holders, epoch and operation-count keys.
    fn keys(&self, sale: SaleId) -> [String; 4] {
        ["stock", "held", "epoch", "seq"].map(|key| format!("{}:sale:{sale}:{key}", self.prefix))
    }

    /// The epoch this process loaded `sale` under; a sale it never loaded is not its to
    /// sell.
    fn epoch(&self, sale: SaleId) -> Result<i64, GateRefusal> {
        self.epochs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&sale)
            .copied()
            .ok_or_else(|| {
                GateRefusal::Unavailable(format!("the stock gate has not loaded sale {sale}"))
            })
    }
}

fn reloaded(sale: SaleId) -> GateRefusal {
    GateRefusal::Unavailable(format!(
        "sale {sale} was loaded into the stock gate again, by another process"
    ))
}

#[async_trait]
impl StockGate for RedisGate {
    async fn load(
        &self,
        sale: SaleId,
        remaining: u64,
        held: &[(UserId, u32)],
    ) -> Result<(), GateRefusal> {
        let [stock, holders, epoch, _] = self.keys(sale);
        let mut pipe = redis::pipe();
        pipe.atomic().incr(&epoch, 1).del(&holders).ignore();
        for chunk in held.chunks(1_000) {
            let pairs: Vec<(&str, u32)> = chunk.iter().map(|(u, n)| (u.as_str(), *n)).collect();
            pipe.hset_multiple(&holders, &pairs).ignore();
        }
        pipe.set(&stock, remaining).ignore();
        let mut connection = self.connection.clone();
        let (loaded,): (i64,) = pipe
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        self.epochs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(sale, loaded);
        Ok(())
    }

    async fn take(
        &self,
        sale: SaleId,
        user: &UserId,
        units: u32,
        limit: u32,
    ) -> Result<GateCount, GateRefusal> {
        let loaded = self.epoch(sale)?;
        let [stock, holders, epoch, seq] = self.keys(sale);
        let mut connection = self.connection.clone();
        let (answer, detail, seq): (i64, i64, i64) = self
            .take
            .key(stock)
            .key(holders)
            .key(epoch)
            .key(seq)
            .arg(user.as_str())
            .arg(units)
            .arg(limit)
            .arg(loaded)
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
            -4 => Err(reloaded(sale)),
            left => Ok(GateCount {
                remaining: left.max(0) as u64,
                seq: seq.max(0) as u64,
            }),
        }
    }

    async fn give_back(
        &self,
        sale: SaleId,
        user: &UserId,
        units: u32,
    ) -> Result<Option<GateCount>, GateRefusal> {
        let loaded = self.epoch(sale)?;
        let [stock, holders, epoch, seq] = self.keys(sale);
        let mut connection = self.connection.clone();
        let (answer, left, seq): (i64, i64, i64) = self
            .give_back
            .key(stock)
            .key(holders)
            .key(epoch)
            .key(seq)
            .arg(user.as_str())
            .arg(units)
            .arg(loaded)
            .invoke_async(&mut connection)
            .await
            .map_err(unavailable)?;
        if answer == -4 {
            // The process that loaded the sale since counted this order from the
            // durable log; handing its units back too would count them twice.
            return Err(reloaded(sale));
        }
        Ok((answer == 1).then(|| GateCount {
            remaining: left.max(0) as u64,
            seq: seq.max(0) as u64,
        }))
    }

    async fn remaining(&self, sale: SaleId) -> Result<u64, GateRefusal> {
        let [stock, ..] = self.keys(sale);
        let mut connection = self.connection.clone();
        let left: Option<i64> = redis::cmd("GET")
            .arg(stock)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        Ok(left.unwrap_or(0).max(0) as u64)
    }
}
