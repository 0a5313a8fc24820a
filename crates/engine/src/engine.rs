use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use stampede_types::{
    Cents, IdempotencyKey, OrderEvent, OrderId, OrderStatus, Quantity, SaleId, SaleStatus, Sku,
    UserId,
};
use tokio::sync::{mpsc, oneshot};

use crate::breaker::CommitBreaker;
use crate::clock::Clock;
use crate::gate::{GateCount, GateRefusal, StockGate};
use crate::payment::{PaymentError, PaymentGateway};
use crate::store::{
    AUDITS_AT_ONCE, OpOutcome, OrderRecord, ProductRecord, Rebuild, SaleRecord, SaleTally, Store,
    StoreError, WriteOp,
};
use crate::writer::{Job, TransitionResult, Writer};

/// When a purchase is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckMode {
    /// After the batch holding the order is committed and fsync'd. Nothing acknowledged
    /// is ever lost.
    #[default]
    Durable,
    /// As soon as the stock is reserved and the order is in the writer's queue. Faster;
    /// a crash or a failed commit loses acknowledged orders still in the queue (at most
    /// `queue_capacity`).
    Reserved,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Bound of the writer's queue; a full queue answers `overloaded`.
    pub queue_capacity: usize,
    /// Most operations committed in one transaction, expiries included (when orders are
    /// due, at most half are taken from the queue). One more only when it is 1: a batch
    /// of one job still expires one order.
    pub batch_size_max: usize,
    /// How long an order waits for payment.
    pub payment_window_ms: i64,
    /// Expiry waits this much past `expires_at` so a payment started just before the
    /// deadline (and bounded by the provider timeout) is decided first.
    pub expiry_grace_ms: i64,
    /// How often the writer looks for due expiries.
    pub expiry_tick_ms: u64,
    pub ack: AckMode,
    /// On a cluster store: the largest lease of a sale's stock one node takes at once.
    pub lease_max: u64,
    /// On a cluster store: a lease nobody bought from for this long goes back to the
    /// sale, so other nodes can sell it.
    pub lease_idle_ms: i64,
    /// On a cluster store: how often the writer heartbeats, reclaims dead nodes' leases,
    /// learns of products and sales created elsewhere and returns idle leases.
    pub cluster_tick_ms: u64,
    /// How often the charge ledger is swept for refunds still owed (closed orders'
    /// entries): a refund that failed, a node that died while refunding, a close that
    /// could not see its entry.
    pub charge_sweep_ms: u64,
    /// A refund that the provider answers `NotCharged` (or fails) keeps trying for at
    /// least this long, and twice the expiry grace if that is longer: a charge that
    /// timed out may still land. Only then is `NotCharged` believed.
    pub refund_patience_min_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 16_384,
            batch_size_max: 1_024,
            payment_window_ms: 15 * 60 * 1000,
            expiry_grace_ms: 5_000,
            expiry_tick_ms: 100,
            ack: AckMode::Durable,
            lease_max: 16_384,
            lease_idle_ms: 2_000,
            cluster_tick_ms: 500,
            charge_sweep_ms: 60_000,
            refund_patience_min_ms: 15_000,
        }
    }
}

/// The answer to a purchase, enough to rebuild the same response on a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub order_id: OrderId,
    pub sale_id: SaleId,
    pub quantity: Quantity,
    pub amount: Cents,
    pub expires_at_ms: i64,
}

impl Placed {
    pub(crate) fn of(order: &OrderRecord) -> Self {
        Placed {
            order_id: order.id,
            sale_id: order.sale_id,
            quantity: order.quantity,
            amount: order.amount,
            expires_at_ms: order.expires_at_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purchase {
    pub placed: Placed,
    /// True when this answers a request seen before (same idempotency key and body).
    pub replay: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PurchaseError {
    #[error("no such flash sale")]
    SaleNotFound,
    #[error("the flash sale has not started")]
    NotStarted,
    #[error("the flash sale has ended")]
    Ended,
    #[error("sold out: {remaining} left, {requested} requested")]
    SoldOut { remaining: u64, requested: u32 },
    #[error("per-user limit of {limit} reached ({held} held)")]
    LimitExceeded { limit: u32, held: u32 },
    /// The shopper's orders of this sale were cancelled or expired `max` times: no more
    /// (each one's answer stays in memory while the sale runs).
    #[error(
        "{max} of this shopper's orders of this sale were cancelled or expired: no more orders"
    )]
    ClosedLimitExceeded { max: u32 },
    #[error("idempotency key was used with a different request")]
    KeyReused,
    #[error("the order queue is full")]
    Overloaded,
    #[error("storage unavailable; nothing was recorded")]
    Unavailable,
    /// The database's circuit breaker is open: refused before anything was taken.
    #[error("the database is failing (circuit open); retry in {retry_after_ms} ms")]
    CircuitOpen { retry_after_ms: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("a product with this sku exists")]
    SkuExists,
    #[error("no such product")]
    ProductNotFound,
    #[error("the product has {available} units not carved into sales")]
    InsufficientStock { available: u64 },
    #[error("{0}")]
    Invalid(String),
    #[error("the write queue is full")]
    Overloaded,
    #[error("storage unavailable; nothing was recorded")]
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("no such order")]
    NotFound,
    #[error("the order has expired")]
    Expired,
    #[error("the order was cancelled")]
    Cancelled,
    #[error("the order is paid")]
    Paid,
    #[error("payment failed: {0}")]
    PaymentFailed(String),
    #[error("payment provider timed out")]
    PaymentTimeout,
    /// The provider was not called (its breaker is open); the order stays payable.
    #[error("payment provider unavailable, retry in {0} ms")]
    PaymentCircuitOpen(u64),
    /// The provider was not called (its calls are at their limit); the order stays
    /// payable.
    #[error("too many payments in progress, retry in {0} ms")]
    PaymentThrottled(u64),
    #[error("the write queue is full")]
    Overloaded,
    /// [`AUDITS_AT_ONCE`] audits are counting already.
    #[error("{AUDITS_AT_ONCE} audits are counting already; retry when one is done")]
    AuditsBusy,
    #[error("storage unavailable")]
    Unavailable,
}

/// Who is asking about an order.
#[derive(Debug, Clone)]
pub enum Actor {
    Admin,
    Shopper(UserId),
}

impl Actor {
    fn may_see(&self, order: &OrderRecord) -> bool {
        match self {
            Actor::Admin => true,
            Actor::Shopper(user) => *user == order.user_id,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewProduct {
    pub sku: Sku,
    pub name: Arc<str>,
    pub price: Cents,
    pub stock: u64,
}

#[derive(Debug, Clone)]
pub struct NewSale {
    pub sku: Sku,
    pub price: Cents,
    pub quantity: u64,
    pub per_user_limit: u32,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductView {
    pub sku: Sku,
    pub name: Arc<str>,
    pub price: Cents,
    pub available: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleView {
    pub record: SaleRecord,
    pub remaining: u64,
    pub status: SaleStatus,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    pub quantity: u64,
    /// Units not held by a durable pending or paid order.
    pub remaining: u64,
    /// Units reserved in memory whose orders are not yet durable (0 when idle).
    pub in_flight: u64,
    pub tally: SaleTally,
    pub consistent: bool,
}

pub(crate) type Outcome = Result<Placed, PurchaseError>;

/// Hash maps on the hot path use foldhash: keys are ours or bounded, and SipHash showed
/// in profiles.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// A set on the hot path, hashed as [`FastMap`].
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

pub(crate) enum IdemEntry {
    /// The first request with this key is being decided; duplicates wait here.
    InFlight {
        waiters: Vec<oneshot::Sender<Outcome>>,
    },
    Done(Placed),
}

pub(crate) struct SaleInner {
    pub remaining: u64,
    /// Units reserved but not yet durable.
    pub in_flight: u64,
    /// Units held (pending + paid + in flight) by each shopper.
    pub held_by_user: FastMap<UserId, u32>,
    /// Orders of each shopper cancelled or expired, up to `CLOSED_ORDERS_PER_SHOPPER_MAX`:
    /// buying and cancelling over and over would otherwise keep adding idempotency
    /// answers for as long as the sale runs.
    pub closed_by_user: FastMap<UserId, u32>,
    /// What the sale's view shows as left when the stock is not all in this node's
    /// memory (a cluster node's lease is a slice of it; an outside gate keeps it
    /// elsewhere): the last count read from where it is.
    pub unsold_hint: u64,
    /// With an outside gate: the gate's operation count (`GateCount::seq`) of the count
    /// in `unsold_hint`, so an answer that comes back late never overwrites a newer one.
    pub unsold_seq: u64,
    /// Cluster only (`remaining` is then this node's lease).
    pub lease: LeaseState,
}

/// How a node on a cluster store keeps its lease of a sale's stock topped up.
#[derive(Debug, Default)]
pub(crate) struct LeaseState {
    /// A lease request is queued for the writer.
    pub asked: bool,
    /// The sale's pool was found empty: answer sold out without asking again until then.
    pub dry_until_ms: i64,
    /// Last time a purchase took units from the lease.
    pub last_take_ms: i64,
    /// Size of the last grant: a new lease is asked for when `remaining` falls below half.
    pub last_grant: u64,
    /// Units buyers waiting for the next lease want: it grants at least that many.
    pub waiting: u64,
}

impl SaleInner {
    /// Shows the gate's count in the sale's view unless a later one is already shown.
    pub(crate) fn see_gate_count(&mut self, count: GateCount) {
        if count.seq > self.unsold_seq {
            self.unsold_seq = count.seq;
            self.unsold_hint = count.remaining;
        }
    }
}

pub(crate) struct SaleState {
    pub record: SaleRecord,
    pub inner: Mutex<SaleInner>,
    /// Woken when a lease request for this sale is answered (cluster only).
    pub refilled: tokio::sync::Notify,
    /// With an outside stock gate, stock is taken and handed back there.
    pub gate: Option<Arc<dyn StockGate>>,
    /// Set once the sale is past `Shared::answers_kept_until`: its orders' idempotency
    /// answers have left memory (or were never loaded), and a replay is answered from
    /// the store.
    pub answers_forgotten: std::sync::atomic::AtomicBool,
}

/// How many of one shopper's orders of one sale may be cancelled or expired before the
/// shopper may place no more in it. Each order's idempotency answer stays in memory
/// while the sale runs, so this bounds what buying and cancelling over and over can
/// hold: at most this many closed orders per shopper, plus those that hold stock.
pub const CLOSED_ORDERS_PER_SHOPPER_MAX: u32 = 32;

impl SaleState {
    /// Whether `user` has had `CLOSED_ORDERS_PER_SHOPPER_MAX` orders of this sale closed.
    pub(crate) fn closed_too_often(&self, user: &UserId) -> bool {
        self.inner
            .lock()
            .closed_by_user
            .get(user)
            .copied()
            .unwrap_or(0)
            >= CLOSED_ORDERS_PER_SHOPPER_MAX
    }

    pub(crate) fn new(
        record: SaleRecord,
        remaining: u64,
        held_by_user: FastMap<UserId, u32>,
        closed_by_user: FastMap<UserId, u32>,
        unsold_hint: u64,
        gate: Option<Arc<dyn StockGate>>,
    ) -> Self {
        SaleState {
            inner: Mutex::new(SaleInner {
                remaining,
                in_flight: 0,
                held_by_user,
                closed_by_user,
                unsold_hint,
                unsold_seq: 0,
                lease: LeaseState::default(),
            }),
            record,
            refilled: tokio::sync::Notify::new(),
            gate,
            answers_forgotten: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn answers_forgotten(&self) -> bool {
        self.answers_forgotten
            .load(std::sync::atomic::Ordering::Acquire)
    }
}

impl SaleState {
    /// Hands back the `units` a take for `user` got from the outside gate while nobody
    /// was there to read its answer: the take's `count` shown first, so the view does
    /// not stay on a count from before the units came back (sold out while the gate
    /// holds them).
    async fn return_unread_take(
        &self,
        gate: &dyn StockGate,
        user: &UserId,
        units: u32,
        count: GateCount,
    ) {
        self.inner.lock().see_gate_count(count);
        self.hand_back_to(gate, user, units).await;
    }

    /// Hands `units` of `user` back to the outside gate, and shows the count it left in
    /// the sale's view: the units are for sale again.
    async fn hand_back_to(&self, gate: &dyn StockGate, user: &UserId, units: u32) {
        let sale = self.record.id;
        match gate.give_back(sale, user, units).await {
            Ok(Some(count)) => self.inner.lock().see_gate_count(count),
            Ok(None) => {}
            Err(error) => {
                // The gate is now short of these units until it is reloaded.
                tracing::error!(%sale, %error, units, "could not hand stock back to the stock gate");
                metrics::counter!("stampede_gate_give_back_failures_total").increment(1);
            }
        }
    }

    /// Hands back units of an order that will not be (or no longer is) held.
    pub(crate) fn give_back(self: &Arc<Self>, user: &UserId, quantity: u32, was_in_flight: bool) {
        if let Some(gate) = &self.gate {
            {
                let mut inner = self.inner.lock();
                if was_in_flight {
                    inner.in_flight -= u64::from(quantity);
                } else {
                    // A durable order closed: counted here as without a gate, so the
                    // closed-orders limit holds while the server runs, not only once a
                    // restart has counted the stored orders.
                    let closed = inner.closed_by_user.entry(user.clone()).or_default();
                    *closed = (*closed + 1).min(CLOSED_ORDERS_PER_SHOPPER_MAX);
                }
            }
            let (gate, state, user) = (gate.clone(), self.clone(), user.clone());
            tokio::spawn(async move { state.hand_back_to(&*gate, &user, quantity).await });
            return;
        }
        let mut inner = self.inner.lock();
        inner.remaining += u64::from(quantity);
        if was_in_flight {
            inner.in_flight -= u64::from(quantity);
        }
        if let Entry::Occupied(mut held) = inner.held_by_user.entry(user.clone()) {
            *held.get_mut() = held.get().saturating_sub(quantity);
            if *held.get() == 0 {
                held.remove();
            }
        }
        if !was_in_flight {
            // A durable order closed (cancelled or expired).
            let closed = inner.closed_by_user.entry(user.clone()).or_default();
            *closed = (*closed + 1).min(CLOSED_ORDERS_PER_SHOPPER_MAX);
        }
        assert!(
            inner.remaining + inner.in_flight <= self.record.quantity,
            "stock returned beyond the sale's quantity"
        );
    }
}

/// The longest wait of the pacing rules in force, and of those before a change that
/// shortened it while pays held under them may still be finishing; in ms.
#[derive(Default)]
struct PaymentWait {
    now: i64,
    before: i64,
    before_until: i64,
}

impl PaymentWait {
    /// The wait the grace covers at `now_ms`.
    fn at(&self, now_ms: i64) -> i64 {
        if now_ms < self.before_until {
            self.now.max(self.before)
        } else {
            self.now
        }
    }
}

pub(crate) struct ProductState {
    pub record: ProductRecord,
}

const IDEM_SHARDS: usize = 64;

/// Most orders `orders_of` lists for one shopper (newest first); older ones are in the
/// store, not in memory.
pub const ORDERS_LISTED_MAX: usize = 100;

/// Most orders the idempotency map makes room for ahead of the sales: 7,168 a shard, the
/// most a table of 8,192 slots holds (hashbrown keeps 1/8 free), about 50 MiB of entries
/// in all. Sales that sell more grow the map past that.
const IDEM_ROOM_MAX: u64 = 7_168 * IDEM_SHARDS as u64;

/// How many replays of purchases whose answers left memory the store is asked about at
/// once. Each is one read of at most `2 × ORDERS_LISTED_MAX` orders by primary key.
const REPLAY_LOOKUPS_AT_ONCE: usize = 4;

/// The longest pause between two tries of a refund.
const REFUND_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(8);

/// The longest a pay waits for room in the writer's queue to note its charge attempt.
pub const LEDGER_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Refund calls to the provider in flight at once: a restart that finds many refunds
/// owed, or a sale whose many paid-for-but-unrecorded orders expire together, does not
/// flood the provider.
const REFUNDS_AT_ONCE: usize = 16;

/// How long a store ping's answer stands for `ready`: probes (a load balancer's, every
/// node's, a flood of them) between two pings are answered from memory, so `/readyz`
/// asks the store at most about once this often, whoever calls it.
const STORE_PING_FRESH: Duration = Duration::from_secs(1);
/// A ping the store has not answered by then counts as not ready: a probe never hangs
/// on a database that accepted the connection and stopped answering.
const STORE_PING_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub config: EngineConfig,
    pub products: RwLock<HashMap<Sku, Arc<Mutex<ProductState>>>>,
    pub sales: RwLock<FastMap<SaleId, Arc<SaleState>>>,
    idem_shards: Vec<Mutex<FastMap<(UserId, IdempotencyKey), IdemEntry>>>,
    idem_hasher: foldhash::fast::RandomState,
    /// Each shopper's newest durable order ids, oldest first: at most
    /// `2 × ORDERS_LISTED_MAX` a shopper (the older half is dropped when it fills), so a
    /// shopper who buys and cancels over and over does not grow it.
    user_orders: Vec<Mutex<FastMap<UserId, Vec<OrderId>>>>,
    /// The provider pays go through, kept for those refunds.
    pub gateway: std::sync::OnceLock<Arc<dyn PaymentGateway>>,
    /// Wakes the ledger's sweep (`sweep_charges`) before its next tick: once the provider
    /// is known (`Engine::use_payments`, so a start refunds what closed unpaid before
    /// it), and after a dead node's orders were reclaimed.
    pub(crate) sweep_now: Arc<tokio::sync::Notify>,
    /// Refund calls in flight (`REFUNDS_AT_ONCE`).
    refunds: tokio::sync::Semaphore,
    /// Refunds started and not finished (retries included).
    refunds_open: std::sync::atomic::AtomicUsize,
    /// The longest a pay may be held back before its charge is made (the pacing rules of
    /// the pay route and the payment provider): added to `EngineConfig::expiry_grace_ms`
    /// (`Shared::expiry_grace_ms`), so a pay that arrived in time is not overtaken by
    /// its order's expiry while it waits its turn. Follows the rules in force.
    payment_wait: Mutex<PaymentWait>,
    /// Orders whose refund runs on this node now, with the time until which it keeps
    /// trying while the provider says nothing was charged. Bounded by `refunds_open`.
    refunding: Mutex<FastMap<OrderId, tokio::time::Instant>>,
    /// The writer's queue, for ledger entries settled in the background; weak, so it
    /// does not keep the queue open.
    ledger: std::sync::OnceLock<mpsc::WeakSender<Job>>,
    /// Watches the writer's commits and refuses purchases while the database fails.
    pub commit_breaker: std::sync::OnceLock<Arc<dyn CommitBreaker>>,
    /// Set by the writer: 0 after a successful commit. `/readyz` fails while it is not.
    pub commit_failures_in_a_row: std::sync::atomic::AtomicU32,
    /// Entries in the writer's expiry heap, as of its last batch (for tests and the
    /// `stampede_writer_expiry_entries` gauge).
    pub expiry_entries: std::sync::atomic::AtomicUsize,
    /// Set by the writer when the store says its memory can no longer be trusted
    /// (`StoreError::halts`): the writer stops for good and the node must restart.
    pub halted: std::sync::atomic::AtomicBool,
    /// The store is shared by several writing nodes: stock comes from leases.
    pub cluster: bool,
    /// Stock is taken in an outside gate (Redis + Lua), not in memory.
    pub gate: Option<Arc<dyn StockGate>>,
    /// Replays the store answers at once (`REPLAY_LOOKUPS_AT_ONCE`): a purchase of a
    /// sale whose answers left memory; more at the same moment are answered
    /// `Overloaded`.
    replay_lookups: tokio::sync::Semaphore,
    /// The store's last ping: when it was answered (`None` before the first) and
    /// whether it succeeded. `ready` reuses it for `STORE_PING_FRESH`.
    store_ping: Mutex<(Option<std::time::Instant>, bool)>,
    /// One ping at a time: callers that find one in flight take the last answer.
    pinging: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub(crate) fn idem_shard(
        &self,
        user: &UserId,
        key: &IdempotencyKey,
    ) -> &Mutex<FastMap<(UserId, IdempotencyKey), IdemEntry>> {
        let mut hasher = self.idem_hasher.build_hasher();
        user.hash(&mut hasher);
        key.hash(&mut hasher);
        &self.idem_shards[(hasher.finish() as usize) % IDEM_SHARDS]
    }

    /// Records the answer to the request holding `(user, key)` and tells the duplicates
    /// waiting for it. A placed order is remembered; a refusal forgets the key so it can
    /// be tried again.
    pub(crate) fn settle(&self, user: &UserId, key: &IdempotencyKey, outcome: Outcome) {
        let id = (user.clone(), key.clone());
        let previous = {
            let mut entries = self.idem_shard(user, key).lock();
            match &outcome {
                // The entry is there (in flight, or already answered under `--ack
                // reserved`) on every path but recovery's: replace it in place, so a full
                // shard is not grown for a key it already holds.
                Ok(placed) => match entries.get_mut(&id) {
                    Some(entry) => Some(std::mem::replace(entry, IdemEntry::Done(placed.clone()))),
                    None => entries.insert(id, IdemEntry::Done(placed.clone())),
                },
                Err(_) => entries.remove(&id),
            }
        };
        if let Some(IdemEntry::InFlight { waiters }) = previous {
            for waiter in waiters {
                let _ = waiter.send(outcome.clone());
            }
        }
    }

    /// Tells the duplicates waiting on `(user, key)` the answer and removes the entry,
    /// whatever the answer: for a sale whose answers are no longer kept in memory.
    pub(crate) fn answer_and_forget(&self, user: &UserId, key: &IdempotencyKey, outcome: Outcome) {
        let previous = self
            .idem_shard(user, key)
            .lock()
            .remove(&(user.clone(), key.clone()));
        if let Some(IdemEntry::InFlight { waiters }) = previous {
            for waiter in waiters {
                let _ = waiter.send(outcome.clone());
            }
        }
    }

    /// How far past its `expires_at` a pending order is expired: the configured grace
    /// (a pay started by the deadline noting its charge and waiting one provider
    /// timeout) plus the longest a charge may now be held back (`payment_wait`).
    pub(crate) fn expiry_grace_ms(&self) -> i64 {
        let wait = self.payment_wait.lock().at(self.clock.now_ms());
        self.config.expiry_grace_ms.max(0).saturating_add(wait)
    }

    /// Until when a sale's orders' idempotency answers stay in memory: its end, then a
    /// payment window and the expiry grace, by which time every order of it is paid or
    /// closed. Afterwards a replay is answered from the store
    /// (`Engine::replay_from_store`), so memory holds the answers of the sales that are
    /// running or just ended, not of every order ever placed.
    pub(crate) fn answers_kept_until(&self, sale: &SaleRecord) -> i64 {
        sale.ends_at_ms
            .saturating_add(self.config.payment_window_ms)
            .saturating_add(self.expiry_grace_ms())
    }

    /// Removes from memory the idempotency answers of every sale past
    /// `answers_kept_until` whose answers are still there, and gives the emptied room
    /// back (keeping the room the running sales still need). Returns how many answers
    /// were removed. Walks every shard once, a shard's lock at a time: call it off the
    /// writer (`spawn_blocking`).
    pub(crate) fn forget_ended_sales(&self) -> usize {
        let now_ms = self.clock.now_ms();
        let retired: Vec<SaleId> = self
            .sales
            .read()
            .values()
            .filter(|sale| self.answers_kept_until(&sale.record) <= now_ms)
            .filter(|sale| {
                // Set before the walk: a purchase that finds no entry then finds the flag
                // (the shard's lock orders the two), and asks the store.
                !sale
                    .answers_forgotten
                    .swap(true, std::sync::atomic::Ordering::AcqRel)
            })
            .map(|sale| {
                // Its per-shopper counts go too: a purchase of it is refused as ended
                // before they are read, and a unit handed back later (a writer stalled
                // past the grace) finds no count to lower, which is harmless.
                let mut inner = sale.inner.lock();
                inner.held_by_user = FastMap::default();
                inner.closed_by_user = FastMap::default();
                drop(inner);
                sale.record.id
            })
            .collect();
        if retired.is_empty() {
            return 0;
        }
        let room = self.room_per_shard();
        let mut removed = 0;
        for shard in &self.idem_shards {
            let mut entries = shard.lock();
            let before = entries.len();
            entries.retain(|_, entry| {
                !matches!(entry, IdemEntry::Done(placed) if retired.contains(&placed.sale_id))
            });
            removed += before - entries.len();
            let keep = entries.len() + room;
            entries.shrink_to(keep);
        }
        metrics::counter!("stampede_idempotency_answers_forgotten_total").increment(removed as u64);
        tracing::info!(
            sales = retired.len(),
            answers = removed,
            "idempotency answers of ended sales left memory; replays are answered from the store"
        );
        removed
    }

    /// Whether a sale is past `answers_kept_until` with its answers still in memory.
    pub(crate) fn has_answers_to_forget(&self) -> bool {
        let now_ms = self.clock.now_ms();
        self.sales.read().values().any(|sale| {
            !sale.answers_forgotten() && self.answers_kept_until(&sale.record) <= now_ms
        })
    }

    /// Units `sale` can still sell, as far as this node knows: a cluster node's lease is
    /// a slice of the sale and an outside gate keeps the stock elsewhere, so for them the
    /// last count seen.
    pub(crate) fn unsold(&self, sale: &SaleState) -> u64 {
        let inner = sale.inner.lock();
        if self.cluster || self.gate.is_some() {
            inner.unsold_hint
        } else {
            inner.remaining
        }
    }

    /// Makes room in the idempotency map, beside the entries it holds, for every order
    /// the running sales can still take (at most `IDEM_ROOM_MAX`), so the map is not
    /// rehashed while they sell. Each shard doubled 13 times on the way to 250,000
    /// orders, and every doubling moved all its entries into freshly faulted pages under
    /// the shard's lock, in the middle of a purchase: 6% of the server's CPU in a durable
    /// run (BENCHMARKS.md, "Room for the orders before the sale"). Bounded by the stock
    /// of the running sales, so room for sales that ended is not kept on top.
    pub(crate) fn make_room_for_orders(&self) {
        let per_shard = self.room_per_shard();
        for shard in &self.idem_shards {
            shard.lock().reserve(per_shard);
        }
    }

    /// The room each shard keeps for the orders the running sales can still take.
    fn room_per_shard(&self) -> usize {
        let now_ms = self.clock.now_ms();
        let units: u64 = self
            .sales
            .read()
            .values()
            .filter(|sale| sale.record.ends_at_ms > now_ms)
            .map(|sale| self.unsold(sale))
            .sum();
        (units.min(IDEM_ROOM_MAX) as usize).div_ceil(IDEM_SHARDS)
    }

    pub(crate) fn user_orders_shard(&self, user: &UserId) -> &Mutex<FastMap<UserId, Vec<OrderId>>> {
        &self.user_orders[(self.idem_hasher.hash_one(user) as usize) % IDEM_SHARDS]
    }

    pub(crate) fn remember_order(&self, user: &UserId, id: OrderId) {
        let mut shard = self.user_orders_shard(user).lock();
        // Most shoppers of a flash sale place one order: room for one, not four.
        let ids = shard
            .entry(user.clone())
            .or_insert_with(|| Vec::with_capacity(1));
        if ids.len() >= 2 * ORDERS_LISTED_MAX {
            ids.drain(..ids.len() - ORDERS_LISTED_MAX);
        }
        ids.push(id);
    }

    /// Refunds, in the background, a charge that may have been made for an order that is
    /// now cancelled or expired: the store found a charge-ledger entry for it when it
    /// closed (`OpOutcome::Transitioned::charge`), or at start. The provider refunds by
    /// the order id as idempotency key; a charge that never happened answers
    /// `NotCharged`. The ledger entry is settled once the provider has refunded or still
    /// says there is nothing to refund after the retries (a charge that timed out may
    /// land late); if it cannot be reached, the entry is written again if it had gone
    /// (`WriteOp::ChargeOwed`) and the ledger's sweep tries again.
    pub(crate) fn refund_if_charged(self: &Arc<Self>, order_id: OrderId, amount: Cents) {
        if let Some(gateway) = self.gateway.get().cloned()
            && self.watch_refund(order_id, false)
        {
            self.spawn_refund(order_id, amount, gateway);
        }
        // No provider known yet: the ledger's sweep makes the refund once it is.
    }

    /// How long a refund keeps trying while the provider says nothing was charged. A
    /// charge in flight lands within one provider timeout after its pay noted it (the
    /// expiry grace covers that): `NotCharged` is believed only once twice that, and at
    /// least `EngineConfig::refund_patience_min_ms`, has passed, with a last try then.
    fn refund_deadline(&self) -> tokio::time::Instant {
        let patience = std::time::Duration::from_millis(
            (2 * self.expiry_grace_ms() as u64).max(self.config.refund_patience_min_ms),
        );
        tokio::time::Instant::now() + patience
    }

    /// Registers a refund of `order_id` on this node, one at a time (a close, a late
    /// charge and the sweep may all ask): true when this call registered it and must
    /// run it (`spawn_refund`). With `late` (a charge that may land after the close, or
    /// has), a running refund keeps trying a full patience from now; the sweep's and a
    /// close's asks must not extend it, or a refund that finds nothing would never end.
    ///
    /// A refund ends (`end_refund`) under the same lock, queueing the ledger entry's
    /// removal there: a late charge registered here either extends the refund before it
    /// ends, or finds it ended and its removal already queued, so the entry the late
    /// charge then writes (`note_late_charge`) lands after that removal, never before it.
    fn watch_refund(&self, order_id: OrderId, late: bool) -> bool {
        let deadline = self.refund_deadline();
        let mut refunding = self.refunding.lock();
        if let Some(running) = refunding.get_mut(&order_id) {
            if late {
                *running = (*running).max(deadline);
            }
            return false;
        }
        refunding.insert(order_id, deadline);
        true
    }

    /// Ends this node's refund of `order_id` (`watch_refund`); with `settle`, queues the
    /// removal of the order's ledger entry (`settle_charge`) under the same lock.
    fn end_refund(
        &self,
        refunding: &mut FastMap<OrderId, tokio::time::Instant>,
        order_id: OrderId,
        settle: bool,
    ) {
        refunding.remove(&order_id);
        if settle {
            self.settle_charge(order_id);
        }
    }

    /// Runs the refund `watch_refund` registered, in the background.
    fn spawn_refund(
        self: &Arc<Self>,
        order_id: OrderId,
        amount: Cents,
        gateway: Arc<dyn PaymentGateway>,
    ) {
        self.refunds_open
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("stampede_refunds_started_total").increment(1);
        let shared = self.clone();
        tokio::spawn(async move {
            let key = order_id.to_string();
            let mut last_error = None;
            let mut delay = std::time::Duration::from_secs(1);
            loop {
                let Ok(permit) = shared.refunds.acquire().await else {
                    shared.end_refund(&mut shared.refunding.lock(), order_id, false);
                    break;
                };
                let answer = gateway.refund(&key, amount).await;
                drop(permit);
                match answer {
                    Ok(()) => {
                        last_error = None;
                        metrics::counter!("stampede_refunds_total", "outcome" => "refunded")
                            .increment(1);
                        shared.end_refund(&mut shared.refunding.lock(), order_id, true);
                        break;
                    }
                    Err(error) => last_error = Some(error),
                }
                let now = tokio::time::Instant::now();
                let wait = {
                    // Decided, given up and the entry's removal queued under one lock: a
                    // late charge's ask either comes before (and extends the deadline)
                    // or finds no refund running, and writes its entry after the removal.
                    let mut refunding = shared.refunding.lock();
                    let deadline = refunding.get(&order_id).copied().unwrap_or(now);
                    if now >= deadline {
                        let settle = matches!(last_error, Some(PaymentError::NotCharged));
                        shared.end_refund(&mut refunding, order_id, settle);
                        None
                    } else {
                        Some(deadline - now)
                    }
                };
                let Some(wait) = wait else {
                    break;
                };
                tokio::time::sleep(delay.min(wait)).await;
                delay = (delay * 2).min(REFUND_RETRY_MAX);
            }
            match last_error {
                Some(PaymentError::NotCharged) => {
                    tracing::info!(%order_id, "no charge to refund found for a closed unpaid order");
                    metrics::counter!("stampede_refunds_total", "outcome" => "nothing_charged")
                        .increment(1);
                }
                Some(error) => {
                    tracing::warn!(%order_id, %error, "refund for a closed unpaid order failed; the ledger's sweep tries again");
                    metrics::counter!("stampede_refunds_total", "outcome" => "failed").increment(1);
                    metrics::counter!("stampede_refund_failures_total").increment(1);
                    // The entry may be gone: a refund of the order that ended earlier may
                    // have settled it on `NotCharged`. Written again, so the sweep keeps
                    // refunding (an entry still there stays as it is).
                    shared.record_owed(order_id, amount).await;
                }
                None => {}
            }
            // This refund's entry in `refunding` is gone (removed where the loop ended);
            // one removed here could be a newer refund's.
            shared
                .refunds_open
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }

    /// In the background, for a charge that may land, or has landed, after the close of
    /// `order_id`, whose close's refund may already have settled the order's ledger
    /// entry: notes it (`note_late_charge`), then refunds.
    pub(crate) fn owe_refund(self: &Arc<Self>, order_id: OrderId, amount: Cents) {
        let shared = self.clone();
        tokio::spawn(async move {
            if let Some(gateway) = shared.note_late_charge(order_id, amount).await {
                shared.spawn_refund(order_id, amount, gateway);
            }
        });
    }

    /// Registers a refund of `order_id` first (or extends the running one a full
    /// patience from now), then durably notes the refund owed (`WriteOp::ChargeOwed`)
    /// before returning. In that order, a refund that gives up on `NotCharged`
    /// meanwhile cannot remove the note after it is written (`watch_refund`). Answers the
    /// provider when this call registered the refund: the caller must then run it
    /// (`spawn_refund`) or end it (`end_refund`). Only a paid order is left alone.
    async fn note_late_charge(
        self: &Arc<Self>,
        order_id: OrderId,
        amount: Cents,
    ) -> Option<Arc<dyn PaymentGateway>> {
        let gateway = self.gateway.get().cloned();
        let started = gateway.is_some() && self.watch_refund(order_id, true);
        let owed = self.record_owed(order_id, amount).await;
        match gateway {
            Some(gateway) if started && owed => Some(gateway),
            _ => {
                if started {
                    // Paid: nothing to refund; the registration is given back unused.
                    self.end_refund(&mut self.refunding.lock(), order_id, false);
                }
                // Otherwise running already (and now kept at it), or no provider known
                // yet (the sweep refunds once it is).
                None
            }
        }
    }

    /// Writes `WriteOp::ChargeOwed` for the order through the writer; false only when
    /// the order turned out paid (nothing to refund). A write that fails is logged and
    /// answered true: the refund is tried all the same.
    async fn record_owed(&self, order_id: OrderId, amount: Cents) -> bool {
        let Some(jobs) = self.ledger.get().and_then(mpsc::WeakSender::upgrade) else {
            return true;
        };
        let (reply, answer) = oneshot::channel();
        let job = Job::Ledger {
            op: WriteOp::ChargeOwed {
                order_id,
                amount,
                at_ms: self.clock.now_ms(),
            },
            reply,
        };
        if jobs.send(job).await.is_err() {
            return true;
        }
        match answer.await {
            Ok(Ok(OpOutcome::Refused {
                current: OrderStatus::Paid,
            })) => false,
            Ok(Ok(_)) => true,
            _ => {
                tracing::warn!(%order_id, "refund owed for a closed order not written to the charge ledger; only this process's retries make it");
                true
            }
        }
    }

    /// Queues the removal of the order's charge-ledger entry, without waiting: called
    /// under the `refunding` lock by a refund that ends (`end_refund`), so it must not
    /// block. A removal the queue has no room for, or whose commit fails, is not made:
    /// the entry stays, and the ledger's sweep settles it later (a paid order's at once,
    /// a closed one's after a refund that finds nothing or the charge).
    pub(crate) fn settle_charge(&self, order_id: OrderId) {
        let Some(jobs) = self.ledger.get().and_then(mpsc::WeakSender::upgrade) else {
            return;
        };
        Self::send_settle(&jobs, order_id);
    }

    /// As `settle_charge`, for the ledger's sweep: only while at least half of the
    /// writer's queue is free. A sweep may find thousands of entries (paid orders whose
    /// removal a full queue dropped during the surge) and must not take the room the
    /// shoppers' purchases need: `false` once the queue is fuller than that, and the
    /// next sweep settles the rest.
    fn settle_charge_if_room(&self, order_id: OrderId) -> bool {
        let Some(jobs) = self.ledger.get().and_then(mpsc::WeakSender::upgrade) else {
            return false;
        };
        if jobs.capacity() < jobs.max_capacity().div_ceil(2) {
            return false;
        }
        Self::send_settle(&jobs, order_id);
        true
    }

    fn send_settle(jobs: &mpsc::Sender<Job>, order_id: OrderId) {
        let (reply, _) = oneshot::channel();
        let job = Job::Ledger {
            op: WriteOp::ChargeSettled { order_id },
            reply,
        };
        if jobs.try_send(job).is_err() {
            tracing::debug!(%order_id, "charge ledger entry not settled (queue full); the sweep settles it");
        }
    }

    /// Remembers the provider; the first time, the ledger's sweep runs at once, so the
    /// refunds owed from before (orders that closed unpaid) are made now.
    pub(crate) fn use_payments(&self, gateway: &Arc<dyn PaymentGateway>) {
        if self.gateway.get().is_none() && self.gateway.set(gateway.clone()).is_ok() {
            self.sweep_now.notify_one();
        }
    }

    /// Marks the key `Done` only if nobody decided it yet.
    pub(crate) fn settle_if_in_flight(&self, user: &UserId, key: &IdempotencyKey, placed: &Placed) {
        let waiters = {
            let mut entries = self.idem_shard(user, key).lock();
            match entries.get_mut(&(user.clone(), key.clone())) {
                Some(entry @ IdemEntry::InFlight { .. }) => {
                    match std::mem::replace(entry, IdemEntry::Done(placed.clone())) {
                        IdemEntry::InFlight { waiters } => waiters,
                        IdemEntry::Done(_) => unreachable!("matched InFlight"),
                    }
                }
                _ => return,
            }
        };
        for waiter in waiters {
            let _ = waiter.send(Ok(placed.clone()));
        }
    }

    pub(crate) fn sale(&self, id: SaleId) -> Option<Arc<SaleState>> {
        self.sales.read().get(&id).cloned()
    }
}

/// The inventory engine. Cheap to share behind an `Arc`.
pub struct Engine {
    shared: Arc<Shared>,
    pub(crate) jobs: mpsc::Sender<Job>,
    /// The queue's receiving end; the writer holds it while it runs (see `Writer`).
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
    writer: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The charge ledger's sweep (`sweep_charges`), stopped with the writer.
    sweep: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// One permit per audit counting, [`AUDITS_AT_ONCE`] in all: held from before its
    /// job is queued until its count is done.
    audits: Arc<tokio::sync::Semaphore>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("durable state breaks an invariant: {0}")]
    Invariant(String),
    #[error("the stock gate could not be loaded: {0}")]
    Gate(String),
}

impl Engine {
    /// Rebuilds the in-memory state from the store's durable orders and starts the writer.
    pub async fn open(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
    ) -> Result<Engine, OpenError> {
        Self::open_with_gate(store, clock, config, None).await
    }

    /// As `open`, taking stock in `gate` (Redis + Lua, the conventional design) instead
    /// of in memory; the gate is reloaded from the durable orders first.
    pub async fn open_with_gate(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
        gate: Option<Arc<dyn StockGate>>,
    ) -> Result<Engine, OpenError> {
        assert!(config.queue_capacity > 0 && config.batch_size_max > 0);
        let cluster = store.node().is_some();
        if cluster && gate.is_some() {
            return Err(OpenError::Invariant(
                "a cluster store leases its stock; it takes no outside stock gate".into(),
            ));
        }

        let shared = Shared {
            store,
            clock,
            config: config.clone(),
            products: RwLock::new(HashMap::new()),
            sales: RwLock::new(FastMap::default()),
            idem_shards: (0..IDEM_SHARDS)
                .map(|_| Mutex::new(FastMap::default()))
                .collect(),
            idem_hasher: foldhash::fast::RandomState::default(),
            user_orders: (0..IDEM_SHARDS)
                .map(|_| Mutex::new(FastMap::default()))
                .collect(),
            commit_breaker: Default::default(),
            commit_failures_in_a_row: Default::default(),
            expiry_entries: Default::default(),
            halted: Default::default(),
            gateway: Default::default(),
            sweep_now: Default::default(),
            refunds: tokio::sync::Semaphore::new(REFUNDS_AT_ONCE),
            refunds_open: Default::default(),
            payment_wait: Default::default(),
            refunding: Default::default(),
            ledger: Default::default(),
            cluster,
            gate: gate.clone(),
            replay_lookups: tokio::sync::Semaphore::new(REPLAY_LOOKUPS_AT_ONCE),
            // The store answered the load a moment ago.
            store_ping: Mutex::new((None, true)),
            pinging: Default::default(),
        };
        // The orders are folded into the state as the store reads them.
        let mut loaded = Loaded {
            shared: &shared,
            now_ms: shared.clock.now_ms(),
            sales: Vec::new(),
            retired: Default::default(),
            held_units: HashMap::new(),
            held_by_user: HashMap::new(),
            closed_by_user: HashMap::new(),
            expiries: Vec::new(),
        };
        shared.store.load(&mut loaded).await?;
        let Loaded {
            sales,
            retired,
            mut held_units,
            mut held_by_user,
            mut closed_by_user,
            expiries,
            ..
        } = loaded;

        for sale in sales {
            let held = held_units.remove(&sale.id).unwrap_or(0);
            if held > sale.quantity {
                return Err(OpenError::Invariant(format!(
                    "sale {} holds {held} units of {}",
                    sale.id, sale.quantity
                )));
            }
            let users = held_by_user.remove(&sale.id).unwrap_or_default();
            if let Some((user, units)) = users
                .iter()
                .find(|(_, units)| **units > sale.per_user_limit)
            {
                return Err(OpenError::Invariant(format!(
                    "shopper {user} holds {units} units of sale {} (limit {})",
                    sale.id, sale.per_user_limit
                )));
            }
            // On a cluster store a node starts with no lease: it sells nothing until the
            // database grants it some of the stock.
            let unsold = sale.quantity - held;
            if let Some(gate) = &gate {
                let held: Vec<(UserId, u32)> = users
                    .iter()
                    .map(|(user, units)| (user.clone(), *units))
                    .collect();
                gate.load(sale.id, unsold, &held)
                    .await
                    .map_err(|error| OpenError::Gate(error.to_string()))?;
            }
            let in_memory = if cluster || gate.is_some() { 0 } else { unsold };
            let is_retired = retired.contains(&sale.id);
            // A retired sale's per-shopper counts are not kept (`forget_ended_sales`).
            let closed = closed_by_user.remove(&sale.id).unwrap_or_default();
            let (users, closed) = if is_retired {
                (FastMap::default(), FastMap::default())
            } else {
                (users, closed)
            };
            let state = SaleState::new(sale, in_memory, users, closed, unsold, gate.clone());
            if is_retired {
                state
                    .answers_forgotten
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            shared
                .sales
                .write()
                .insert(state.record.id, Arc::new(state));
        }
        if let Some((sale_id, _)) = held_units.into_iter().next() {
            return Err(OpenError::Invariant(format!(
                "orders reference unknown sale {sale_id}"
            )));
        }

        // Room for what the running sales can still sell, once, with every sale known.
        shared.make_room_for_orders();
        let shared = Arc::new(shared);

        let (jobs, receiver) = mpsc::channel(config.queue_capacity);
        let _ = shared.ledger.set(jobs.downgrade());
        let queue = Arc::new(tokio::sync::Mutex::new(receiver));
        let held = queue
            .clone()
            .try_lock_owned()
            .expect("a new queue is held by nobody");
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let writer = Writer::new(shared.clone(), held, shutdown_rx, expiries);
        let handle = tokio::spawn(writer.run());
        // The charge ledger is not loaded: a pending order's entry is found by its close,
        // and the sweep settles the rest once the provider is known.
        let sweep = tokio::spawn(sweep_charges(
            Arc::downgrade(&shared),
            shared.sweep_now.clone(),
            std::time::Duration::from_millis(shared.config.charge_sweep_ms.max(1)),
        ));
        Ok(Engine {
            shared,
            jobs,
            queue,
            shutdown: Mutex::new(Some(shutdown_tx)),
            writer: tokio::sync::Mutex::new(Some(handle)),
            sweep: Mutex::new(Some(sweep)),
            audits: Arc::new(tokio::sync::Semaphore::new(AUDITS_AT_ONCE as usize)),
        })
    }

    pub fn now_ms(&self) -> i64 {
        self.shared.clock.now_ms()
    }

    /// How many idempotency answers (and keys being decided) memory holds. For tests:
    /// an ended sale's answers leave memory.
    #[doc(hidden)]
    pub fn idempotency_answers(&self) -> usize {
        self.shared
            .idem_shards
            .iter()
            .map(|shard| shard.lock().len())
            .sum()
    }

    /// Entries in the writer's expiry heap after its last batch. For tests: bounded by
    /// the pending orders, not by how many were ever placed.
    #[doc(hidden)]
    pub fn expiry_entries(&self) -> usize {
        self.shared
            .expiry_entries
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many (sale, shopper) unit counts memory holds for the per-shopper limits. For
    /// tests: an ended sale's counts leave memory with its answers.
    #[doc(hidden)]
    pub fn shopper_counts(&self) -> usize {
        self.shared
            .sales
            .read()
            .values()
            .map(|sale| sale.inner.lock().held_by_user.len())
            .sum()
    }

    /// How many entries the idempotency map holds before one of its shards must grow,
    /// summed over the shards. For tests: a sale's orders fit in the room made for them
    /// when it opened.
    #[doc(hidden)]
    pub fn idempotency_capacity(&self) -> usize {
        self.shared
            .idem_shards
            .iter()
            .map(|shard| shard.lock().capacity())
            .sum()
    }

    /// Puts the writer's commits under `breaker`: it hears of every commit, and while it
    /// is open purchases are refused before they take stock. Set once; later calls are
    /// ignored.
    pub fn guard_commits(&self, breaker: Arc<dyn CommitBreaker>) {
        let _ = self.shared.commit_breaker.set(breaker);
    }

    /// How long past its `expires_at` a pending order is expired now: the configured
    /// grace and the pacing waits of the rules in force (or of rules a change shortened,
    /// while pays held under them may still be finishing).
    pub fn expiry_grace(&self) -> Duration {
        Duration::from_millis(self.shared.expiry_grace_ms().max(0) as u64)
    }

    /// Tells the engine the longest a charge may now be held back before it is made
    /// (the pacing rules of the pay route and the payment provider, their `max_queue`s;
    /// zero without them): pending
    /// orders then expire that much later than the configured grace, so a pay that
    /// started before its order's deadline is not overtaken by the expiry (and its
    /// charge refunded) while it waits its turn. Refunds wait that much longer for a
    /// charge that may still land. Call again when the rules change.
    ///
    /// A change that shortens it takes effect for the grace only once a pay held under
    /// the rules before could have finished its wait and then its charge.
    pub fn set_payment_wait_max(&self, wait: Duration) {
        let wait = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 4);
        let shared = &self.shared;
        let now = shared.clock.now_ms();
        let mut waits = shared.payment_wait.lock();
        // The longest still owed: the one being replaced, or an earlier one not yet over.
        let owed = waits.at(now);
        if owed > wait {
            // A pay released at the end of its wait still notes and makes its charge:
            // the configured grace covers that, so the longer wait holds until then too.
            waits.before = owed;
            waits.before_until = now
                .saturating_add(owed)
                .saturating_add(shared.config.expiry_grace_ms.max(0));
        }
        waits.now = wait;
    }

    /// The store the engine writes to (for settings kept beside the orders).
    pub fn store(&self) -> Arc<dyn Store> {
        self.shared.store.clone()
    }

    /// How many operations the writer's queue holds at most.
    pub fn queue_capacity(&self) -> usize {
        self.shared.config.queue_capacity
    }

    /// Operations waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        self.shared.config.queue_capacity - self.jobs.capacity()
    }

    /// Stops accepting writes, commits everything already queued, and waits for the
    /// writer to finish. Idempotent.
    pub async fn shutdown(&self) {
        if let Some(sweep) = self.sweep.lock().take() {
            sweep.abort();
        }
        if let Some(signal) = self.shutdown.lock().take() {
            let _ = signal.send(());
        }
        if let Some(handle) = self.writer.lock().await.take() {
            let _ = handle.await;
        }
    }

    /// Stops the writer where it is, as a `kill -9` would: queued jobs are dropped and an
    /// uncommitted batch is rolled back by the store. For crash tests.
    pub async fn crash(&self) {
        if let Some(sweep) = self.sweep.lock().take() {
            sweep.abort();
        }
        if let Some(handle) = self.writer.lock().await.take() {
            handle.abort();
            let _ = handle.await;
        }
        // Jobs pushed by callers that had their place in the queue as the writer stopped:
        // a dead process answers none of them (their callers get `Unavailable`).
        {
            let mut queue = self.queue.lock().await;
            queue.close();
            while queue.recv().await.is_some() {}
        }
        // A commit the store had begun may outlive the task (SQLite's runs on a thread of
        // its own). A killed process writes nothing more; nor, once this returns, does
        // this engine: an engine opened next loads everything it wrote.
        self.shared.store.stop_writes().await;
    }

    /// Whether the writer stopped for good because the store fenced it off or lost a
    /// commit's outcome; only a restart (which rebuilds state from the store) recovers.
    pub fn halted(&self) -> bool {
        self.shared
            .halted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the writer is running and the store answers. The writer's state is read
    /// live; the store's answer is at most `STORE_PING_FRESH` old (plus
    /// `STORE_PING_TIMEOUT` while a ping is out), from one ping at a time
    /// (`store_answers`), so however many probes arrive the store sees about one ping a
    /// second.
    pub async fn ready(&self) -> bool {
        !self.jobs.is_closed()
            && self
                .shared
                .commit_failures_in_a_row
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
            && self.store_answers().await
    }

    async fn store_answers(&self) -> bool {
        use std::sync::atomic::Ordering;
        let last = {
            let (at, ok) = *self.shared.store_ping.lock();
            if at.is_some_and(|at| at.elapsed() < STORE_PING_FRESH) {
                return ok;
            }
            ok
        };
        if self.shared.pinging.swap(true, Ordering::AcqRel) {
            // Another probe is asking the store right now: the last answer stands.
            return last;
        }
        // The ping runs in a task of its own, so its answer is recorded even when the
        // probe that started it gives up first (a kubelet's probe times out after 1 s by
        // default, before the ping's 2 s): otherwise a hung database would never be
        // recorded as down, and every other probe would go on reading "ready".
        let shared = self.shared.clone();
        let ping = tokio::spawn(async move {
            // Lets the next caller ping even if this task panics.
            struct Pinging<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for Pinging<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            let _pinging = Pinging(&shared.pinging);
            let ok = matches!(
                tokio::time::timeout(STORE_PING_TIMEOUT, shared.store.ping()).await,
                Ok(Ok(()))
            );
            *shared.store_ping.lock() = (Some(std::time::Instant::now()), ok);
            metrics::counter!("stampede_store_pings_total", "ok" => if ok { "true" } else { "false" })
                .increment(1);
            ok
        });
        ping.await.unwrap_or(false)
    }

    // ---- catalogue -------------------------------------------------------------------

    pub async fn create_product(&self, new: NewProduct) -> Result<ProductView, AdminError> {
        let record = ProductRecord {
            sku: new.sku.clone(),
            name: new.name,
            price: new.price,
            available: new.stock,
            created_at_ms: self.now_ms(),
        };
        {
            // Reserve the sku in memory first, so two concurrent creations cannot both
            // reach the writer.
            let mut products = self.shared.products.write();
            if products.contains_key(&new.sku) {
                return Err(AdminError::SkuExists);
            }
            products.insert(
                new.sku.clone(),
                Arc::new(Mutex::new(ProductState {
                    record: record.clone(),
                })),
            );
        }
        let (reply, answer) = oneshot::channel();
        let undo = || {
            self.shared.products.write().remove(&new.sku);
        };
        if self
            .jobs
            .try_send(Job::CreateProduct {
                record: record.clone(),
                reply,
            })
            .is_err()
        {
            undo();
            return Err(AdminError::Overloaded);
        }
        // From here the writer owns the outcome, and undoes the reservation itself if the
        // commit fails: this future may be dropped by a client that hangs up.
        match answer.await {
            Ok(Ok(())) => Ok(ProductView {
                sku: record.sku,
                name: record.name,
                price: record.price,
                available: record.available,
            }),
            Ok(Err(Some(refusal))) => Err(refusal),
            _ => Err(AdminError::Unavailable),
        }
    }

    pub fn product(&self, sku: &str) -> Option<ProductView> {
        let sku = Sku::parse(sku).ok()?;
        let product = self.shared.products.read().get(&sku).cloned()?;
        let product = product.lock();
        Some(ProductView {
            sku: product.record.sku.clone(),
            name: product.record.name.clone(),
            price: product.record.price,
            available: product.record.available,
        })
    }

    pub async fn create_sale(&self, new: NewSale) -> Result<SaleView, AdminError> {
        if new.ends_at_ms <= new.starts_at_ms {
            return Err(AdminError::Invalid(
                "ends_at must be after starts_at".into(),
            ));
        }
        // A sale that could never sell would still take its stock out of the product for
        // good (nothing hands an ended sale's unsold units back): a typo'd year, refused.
        if new.ends_at_ms <= self.now_ms() {
            return Err(AdminError::Invalid(
                "ends_at must be in the future: the sale would take its stock and never sell"
                    .into(),
            ));
        }
        if new.quantity == 0 {
            return Err(AdminError::Invalid("quantity must be at least 1".into()));
        }
        if new.per_user_limit == 0 {
            return Err(AdminError::Invalid(
                "per_user_limit must be at least 1".into(),
            ));
        }
        let product = self
            .shared
            .products
            .read()
            .get(&new.sku)
            .cloned()
            .ok_or(AdminError::ProductNotFound)?;
        {
            let mut product = product.lock();
            if product.record.available < new.quantity {
                return Err(AdminError::InsufficientStock {
                    available: product.record.available,
                });
            }
            product.record.available -= new.quantity;
        }
        let give_back = || product.lock().record.available += new.quantity;
        let record = SaleRecord {
            id: SaleId::new(),
            sku: new.sku,
            price: new.price,
            quantity: new.quantity,
            per_user_limit: new.per_user_limit,
            starts_at_ms: new.starts_at_ms,
            ends_at_ms: new.ends_at_ms,
            created_at_ms: self.now_ms(),
        };
        let (reply, answer) = oneshot::channel();
        if self
            .jobs
            .try_send(Job::CreateSale {
                record: record.clone(),
                reply,
            })
            .is_err()
        {
            give_back();
            return Err(AdminError::Overloaded);
        }
        // The writer makes the sale visible once it is durable, and gives the stock back
        // to the product itself if the commit fails.
        match answer.await {
            Ok(Ok(())) => {
                // Here rather than on the writer: a shard that must move its entries to
                // make room holds up only the purchases that hash to it, not every commit.
                self.shared.make_room_for_orders();
                Ok(self.sale(record.id).expect("sale is visible after commit"))
            }
            Ok(Err(Some(refusal))) => Err(refusal),
            _ => Err(AdminError::Unavailable),
        }
    }

    pub fn sale(&self, id: SaleId) -> Option<SaleView> {
        let sale = self.shared.sale(id)?;
        let remaining = self.shared.unsold(&sale);
        let record = &sale.record;
        Some(SaleView {
            status: SaleStatus::at(
                self.now_ms(),
                record.starts_at_ms,
                record.ends_at_ms,
                remaining,
            ),
            remaining,
            record: record.clone(),
        })
    }

    // ---- the hot path ----------------------------------------------------------------

    /// Takes stock for one purchase and, in `AckMode::Durable`, waits until its order is
    /// committed. Never touches the store on the way in, but for a late replay of a
    /// sale whose answers left memory (`replay_from_store`); sold-out answers never
    /// reach the writer.
    pub async fn purchase(
        &self,
        user: UserId,
        key: IdempotencyKey,
        sale_id: SaleId,
        quantity: Quantity,
    ) -> Result<Purchase, PurchaseError> {
        // A duplicate that finds the first attempt failed retries as a fresh request; a
        // few rounds are enough because a failed attempt removes its entry.
        for _ in 0..4 {
            match self.try_purchase(&user, &key, sale_id, quantity).await {
                Attempt::Answer(answer) => {
                    let outcome = match &answer {
                        Ok(p) if p.replay => "replay",
                        Ok(_) => "placed",
                        Err(e) => e.metric_label(),
                    };
                    count_purchase(outcome);
                    return answer;
                }
                Attempt::RetryAfterDuplicateFailed => continue,
            }
        }
        count_purchase("overloaded");
        Err(PurchaseError::Overloaded)
    }

    /// Answers a purchase of a sale whose idempotency answers left memory
    /// (`Shared::answers_kept_until`): the shopper's order under this key, found among
    /// their newest orders (at most `2 × ORDERS_LISTED_MAX`, read by id), is replayed;
    /// the key on another request is `KeyReused`; no such order means a new purchase of
    /// an ended sale. At most `REPLAY_LOOKUPS_AT_ONCE` at once, the rest `Overloaded`.
    async fn replay_from_store(
        &self,
        user: &UserId,
        key: &IdempotencyKey,
        sale_id: SaleId,
        quantity: Quantity,
    ) -> Result<Purchase, PurchaseError> {
        let Ok(_permit) = self.shared.replay_lookups.try_acquire() else {
            return Err(PurchaseError::Overloaded);
        };
        if self.shared.cluster {
            // Any node may have placed it: the key's order, from the database.
            metrics::counter!("stampede_idempotency_store_lookups_total").increment(1);
            return match self.shared.store.order_by_key(user, key).await {
                Ok(Some(order)) => replayed(&order, sale_id, quantity),
                Ok(None) => Err(PurchaseError::Ended),
                Err(_) => Err(PurchaseError::Unavailable),
            };
        }
        let ids: Vec<OrderId> = self
            .shared
            .user_orders_shard(user)
            .lock()
            .get(user)
            .cloned()
            .unwrap_or_default();
        if ids.is_empty() {
            return Err(PurchaseError::Ended);
        }
        metrics::counter!("stampede_idempotency_store_lookups_total").increment(1);
        let orders = self
            .shared
            .store
            .orders_by_id(&ids)
            .await
            .map_err(|_| PurchaseError::Unavailable)?;
        // A retired key may have been used again on another sale (README, under the API
        // table), so one key can name several orders: the one this request repeats
        // answers it, whichever comes first.
        let mut under_key = orders
            .iter()
            .filter(|order| &order.user_id == user && &order.idempotency_key == key)
            .peekable();
        if under_key.peek().is_none() {
            return Err(PurchaseError::Ended);
        }
        match under_key.find(|order| order.sale_id == sale_id && order.quantity == quantity) {
            Some(order) => Ok(Purchase {
                placed: Placed::of(order),
                replay: true,
            }),
            None => Err(PurchaseError::KeyReused),
        }
    }

    /// A cluster node about to refuse a key it does not know (sold out here, or the sale
    /// ended) first asks the database whether another node placed an order under it: a
    /// retry that a load balancer sent elsewhere gets its order (200), not a refusal for
    /// an order it owns. At most `REPLAY_LOOKUPS_AT_ONCE` lookups at once; beyond that,
    /// or when the database cannot say, the refusal stands, as it would without the
    /// lookup (so a flood of refusals never queues on the database).
    async fn refuse_unless_placed_elsewhere(
        &self,
        holder: &KeyHolder<'_>,
        (user, key, sale_id, quantity): (&UserId, &IdempotencyKey, SaleId, Quantity),
        refusal: PurchaseError,
    ) -> Attempt {
        let answer = match self.shared.replay_lookups.try_acquire() {
            Ok(_permit) => {
                metrics::counter!("stampede_idempotency_store_lookups_total").increment(1);
                match self.shared.store.order_by_key(user, key).await {
                    Ok(Some(order)) => replayed(&order, sale_id, quantity),
                    Ok(None) | Err(_) => Err(refusal),
                }
            }
            Err(_) => Err(refusal),
        };
        holder.disarm();
        self.shared.settle(
            user,
            key,
            answer
                .as_ref()
                .map(|p| p.placed.clone())
                .map_err(Clone::clone),
        );
        Attempt::Answer(answer)
    }

    async fn try_purchase(
        &self,
        user: &UserId,
        key: &IdempotencyKey,
        sale_id: SaleId,
        quantity: Quantity,
    ) -> Attempt {
        let same_request =
            |placed: &Placed| placed.sale_id == sale_id && placed.quantity == quantity;
        let shard = self.shared.idem_shard(user, key);
        let seen = {
            let mut entries = shard.lock();
            match entries.entry((user.clone(), key.clone())) {
                Entry::Occupied(mut entry) => match entry.get_mut() {
                    IdemEntry::Done(placed) => Seen::Done(placed.clone()),
                    IdemEntry::InFlight { waiters } => {
                        let (tell, told) = oneshot::channel();
                        waiters.push(tell);
                        Seen::InFlight(told)
                    }
                },
                Entry::Vacant(slot) => {
                    slot.insert(IdemEntry::InFlight {
                        waiters: Vec::new(),
                    });
                    Seen::New
                }
            }
        };
        match seen {
            Seen::Done(placed) => {
                if same_request(&placed) {
                    return Attempt::Answer(Ok(Purchase {
                        placed,
                        replay: true,
                    }));
                }
                // A retired key may have bought again in another sale (README, under the
                // API table), whose answer memory now holds: a late replay of the purchase
                // it first made is answered from the store, with that purchase's order.
                // The entry stays the other sale's.
                if placed.sale_id != sale_id
                    && self
                        .shared
                        .sale(sale_id)
                        .is_some_and(|sale| sale.answers_forgotten())
                {
                    return Attempt::Answer(
                        self.replay_from_store(user, key, sale_id, quantity).await,
                    );
                }
                return Attempt::Answer(Err(PurchaseError::KeyReused));
            }
            Seen::InFlight(first) => {
                return match first.await {
                    Ok(Ok(placed)) if same_request(&placed) => Attempt::Answer(Ok(Purchase {
                        placed,
                        replay: true,
                    })),
                    Ok(Ok(_)) => Attempt::Answer(Err(PurchaseError::KeyReused)),
                    // The first attempt was refused, which forgot the key: this one is
                    // decided afresh, on its own request (its sale or quantity may differ
                    // from the first's, so the first's refusal need not be its answer).
                    Ok(Err(_)) => Attempt::RetryAfterDuplicateFailed,
                    // The writer went away without answering the first attempt.
                    Err(_) => Attempt::Answer(Err(PurchaseError::Unavailable)),
                };
            }
            Seen::New => {}
        }
        // From here this request holds the key: whatever happens, including the future
        // being dropped by a client that hangs up while it waits, the key is settled.
        let holder = KeyHolder {
            shared: &self.shared,
            user,
            key,
            armed: std::sync::atomic::AtomicBool::new(true),
        };
        let refuse = |error: PurchaseError| {
            holder.disarm();
            self.shared.settle(user, key, Err(error.clone()));
            Attempt::Answer(Err(error))
        };

        let Some(sale) = self.shared.sale(sale_id) else {
            return refuse(PurchaseError::SaleNotFound);
        };
        let now_ms = self.now_ms();
        let record = &sale.record;
        if now_ms < record.starts_at_ms {
            return refuse(PurchaseError::NotStarted);
        }
        if now_ms >= record.ends_at_ms {
            if !sale.answers_forgotten() {
                if self.shared.cluster {
                    return self
                        .refuse_unless_placed_elsewhere(
                            &holder,
                            (user, key, sale_id, quantity),
                            PurchaseError::Ended,
                        )
                        .await;
                }
                return refuse(PurchaseError::Ended);
            }
            // The sale's answers left memory: this may be a late replay. The holder stays
            // armed through the lookup: a client that hangs up meanwhile must not leave
            // the key in flight for ever, with every retry of it waiting on nobody.
            let answer = self.replay_from_store(user, key, sale_id, quantity).await;
            holder.disarm();
            self.shared.answer_and_forget(
                user,
                key,
                answer
                    .as_ref()
                    .map(|p| p.placed.clone())
                    .map_err(Clone::clone),
            );
            return Attempt::Answer(answer);
        }
        // A failing database: refuse before taking stock or joining the queue.
        if let Some(breaker) = self.shared.commit_breaker.get()
            && let Err(retry_after) = breaker.admit()
        {
            return refuse(PurchaseError::CircuitOpen {
                retry_after_ms: retry_after.as_millis().max(1) as u64,
            });
        }
        let units = quantity.get();
        if self.shared.gate.is_some() && sale.closed_too_often(user) {
            return refuse(PurchaseError::ClosedLimitExceeded {
                max: CLOSED_ORDERS_PER_SHOPPER_MAX,
            });
        }
        if let Some(gate) = &self.shared.gate {
            // The take runs in a task of its own: a client that hangs up while it is on
            // its way must not leave units taken in the gate with nobody to hand them
            // back; the task gives them back itself when nobody awaits its answer.
            let (tell, told) = oneshot::channel();
            let mut told = UnreadTake {
                told,
                read: false,
                gate: gate.clone(),
                sale: sale.clone(),
                user: user.clone(),
                units,
            };
            let (taker, owner, state) = (gate.clone(), user.clone(), sale.clone());
            let limit = record.per_user_limit;
            tokio::spawn(async move {
                let taken = taker.take(sale_id, &owner, units, limit).await;
                if let Err(Ok(count)) = tell.send(taken) {
                    // Nobody awaits the take.
                    state
                        .return_unread_take(&*taker, &owner, units, count)
                        .await;
                }
            });
            let taken = (&mut told.told).await.unwrap_or_else(|_| {
                Err(GateRefusal::Unavailable(
                    "the gate's task ended without an answer".into(),
                ))
            });
            told.read = true;
            match taken {
                Ok(count) => {
                    let mut inner = sale.inner.lock();
                    inner.in_flight += u64::from(units);
                    inner.see_gate_count(count);
                }
                Err(GateRefusal::SoldOut { remaining }) => {
                    return refuse(PurchaseError::SoldOut {
                        remaining,
                        requested: units,
                    });
                }
                Err(GateRefusal::LimitExceeded { held }) => {
                    return refuse(PurchaseError::LimitExceeded {
                        limit: record.per_user_limit,
                        held,
                    });
                }
                Err(GateRefusal::Unavailable(error)) => {
                    tracing::warn!(%error, "stock gate unavailable");
                    return refuse(PurchaseError::Unavailable);
                }
            }
        }
        let cluster = self.shared.cluster;
        let lease_deadline = tokio::time::Instant::now() + LEASE_WAIT;
        // With an outside gate the stock was taken above; otherwise here, in memory.
        let refill = if self.shared.gate.is_some() {
            false
        } else {
            loop {
                // The guard lives in this block only, so the future stays `Send`.
                let step = {
                    let mut inner = sale.inner.lock();
                    let held = inner.held_by_user.get(user).copied().unwrap_or(0);
                    // A cluster node's counts miss orders placed or closed on other nodes:
                    // there the database's holdings decide (at commit).
                    if inner.closed_by_user.get(user).copied().unwrap_or(0)
                        >= CLOSED_ORDERS_PER_SHOPPER_MAX
                    {
                        Step::Refuse(PurchaseError::ClosedLimitExceeded {
                            max: CLOSED_ORDERS_PER_SHOPPER_MAX,
                        })
                    } else if held + units > record.per_user_limit && !cluster {
                        Step::Refuse(PurchaseError::LimitExceeded {
                            limit: record.per_user_limit,
                            held,
                        })
                    } else if inner.remaining < u64::from(units) {
                        if cluster
                            && now_ms >= inner.lease.dry_until_ms
                            && tokio::time::Instant::now() < lease_deadline
                        {
                            // This node's lease ran short but the sale may have more: ask for
                            // a lease (once for all waiting buyers) and wait for the answer.
                            let ask = !std::mem::replace(&mut inner.lease.asked, true);
                            inner.lease.waiting += u64::from(units);
                            Step::WaitForLease {
                                refilled: sale.refilled.notified(),
                                ask,
                            }
                        } else {
                            Step::Refuse(PurchaseError::SoldOut {
                                remaining: inner.remaining,
                                requested: units,
                            })
                        }
                    } else {
                        inner.remaining -= u64::from(units);
                        inner.in_flight += u64::from(units);
                        *inner.held_by_user.entry(user.clone()).or_default() += units;
                        if cluster {
                            // Top the lease up before it runs dry, so buyers rarely wait.
                            inner.lease.last_take_ms = now_ms;
                            Step::Taken {
                                refill: inner.remaining < inner.lease.last_grant / 2
                                    && now_ms >= inner.lease.dry_until_ms
                                    && !std::mem::replace(&mut inner.lease.asked, true),
                            }
                        } else {
                            Step::Taken { refill: false }
                        }
                    }
                };
                match step {
                    Step::Refuse(error @ PurchaseError::SoldOut { .. }) if cluster => {
                        return self
                            .refuse_unless_placed_elsewhere(
                                &holder,
                                (user, key, sale_id, quantity),
                                error,
                            )
                            .await;
                    }
                    Step::Refuse(error) => return refuse(error),
                    Step::Taken { refill } => break refill,
                    Step::WaitForLease { refilled, ask } => {
                        let waiting = Waiting {
                            sale: &sale,
                            units: u64::from(units),
                        };
                        if ask && !self.ask_for_lease(&sale) {
                            return refuse(PurchaseError::Overloaded);
                        }
                        let _ = tokio::time::timeout_at(lease_deadline, refilled).await;
                        drop(waiting);
                        if self.now_ms() >= record.ends_at_ms {
                            return refuse(PurchaseError::Ended);
                        }
                    }
                }
            }
        };
        if refill {
            self.ask_for_lease(&sale);
        }

        let order = OrderRecord {
            id: OrderId::new(),
            user_id: user.clone(),
            sale_id,
            sku: record.sku.clone(),
            quantity,
            amount: record.price.times(quantity),
            status: OrderStatus::PendingPayment,
            idempotency_key: key.clone(),
            created_at_ms: now_ms,
            expires_at_ms: now_ms + self.shared.config.payment_window_ms,
            updated_at_ms: now_ms,
        };
        let placed = Placed::of(&order);
        let our_id = order.id;
        let ack = self.shared.config.ack;
        let (reply, answer) = oneshot::channel();
        let job = Job::Purchase {
            order,
            sale: sale.clone(),
            reply,
            queued_at: std::time::Instant::now(),
        };
        if let Err(refused) = self.jobs.try_send(job) {
            let error = match refused {
                mpsc::error::TrySendError::Full(_) => PurchaseError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => PurchaseError::Unavailable,
            };
            sale.give_back(user, units, true);
            return refuse(error);
        }
        // The writer settles the key from here on.
        holder.disarm();
        if ack == AckMode::Reserved {
            // Replays see the same order from now on, even before the writer commits
            // (unless the writer has already decided it, either way).
            self.shared.settle_if_in_flight(user, key, &placed);
        }

        match ack {
            AckMode::Reserved => Attempt::Answer(Ok(Purchase {
                placed,
                replay: false,
            })),
            AckMode::Durable => match answer.await {
                // An order placed under this key on another node answers as a replay.
                Ok(outcome) => Attempt::Answer(outcome.map(|placed| Purchase {
                    replay: placed.order_id != our_id,
                    placed,
                })),
                // The writer went away without answering: nothing can be claimed durable.
                Err(_) => refuse(PurchaseError::Unavailable),
            },
        }
    }

    /// Queues a lease request for the writer; false (and the request forgotten) if the
    /// queue is full.
    fn ask_for_lease(&self, sale: &Arc<SaleState>) -> bool {
        let asked = self
            .jobs
            .try_send(Job::Lease { sale: sale.clone() })
            .is_ok();
        if !asked {
            sale.inner.lock().lease.asked = false;
        }
        asked
    }

    // ---- orders ----------------------------------------------------------------------

    pub async fn order(&self, actor: &Actor, id: OrderId) -> Result<OrderRecord, OrderError> {
        let order = self
            .shared
            .store
            .order(id)
            .await
            .map_err(|_| OrderError::Unavailable)?;
        match order {
            Some(order) if actor.may_see(&order) => Ok(order),
            _ => Err(OrderError::NotFound),
        }
    }

    /// How many of `user`'s order ids the engine keeps in memory for `orders_of` (at
    /// most `2 × ORDERS_LISTED_MAX`): for tests and the memory bound's checks.
    pub fn orders_remembered(&self, user: &UserId) -> usize {
        self.shared
            .user_orders_shard(user)
            .lock()
            .get(user)
            .map_or(0, Vec::len)
    }

    pub async fn orders_of(
        &self,
        user: &UserId,
        limit: u32,
    ) -> Result<Vec<OrderRecord>, OrderError> {
        if self.shared.cluster {
            let listed = self
                .shared
                .store
                .orders_of_user(user, limit)
                .await
                .map_err(|_| OrderError::Unavailable)?;
            if let Some(orders) = listed {
                return Ok(orders);
            }
        }
        let ids: Vec<OrderId> = {
            let shard = self.shared.user_orders_shard(user).lock();
            match shard.get(user) {
                Some(ids) => ids
                    .iter()
                    .rev()
                    .take((limit as usize).min(ORDERS_LISTED_MAX))
                    .copied()
                    .collect(),
                None => return Ok(Vec::new()),
            }
        };
        let mut orders = self
            .shared
            .store
            .orders_by_id(&ids)
            .await
            .map_err(|_| OrderError::Unavailable)?;
        orders.sort_by_key(|order| std::cmp::Reverse((order.created_at_ms, order.id)));
        Ok(orders)
    }

    /// Asks the writer to move an order out of `pending_payment`. With `wait`, waits for
    /// room in the (bounded) queue instead of answering `Overloaded`: a pay whose money
    /// has moved must be recorded.
    async fn transition(
        &self,
        id: OrderId,
        event: OrderEvent,
        wait: bool,
    ) -> Result<TransitionResult, OrderError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Transition {
            order_id: id,
            event,
            reply,
        };
        if wait {
            self.jobs
                .send(job)
                .await
                .map_err(|_| OrderError::Unavailable)?;
        } else {
            self.jobs
                .try_send(job)
                .map_err(|_| OrderError::Overloaded)?;
        }
        answer
            .await
            .map_err(|_| OrderError::Unavailable)?
            .map_err(|_| OrderError::Unavailable)
    }

    /// Charges the order through `gateway` (idempotency key = order id) and marks it paid.
    /// The writer decides between a pay and a concurrent cancel or expiry; if the pay
    /// loses after charging, the charge is refunded.
    pub async fn pay(
        self: &Arc<Self>,
        user: &UserId,
        id: OrderId,
        gateway: Arc<dyn PaymentGateway>,
    ) -> Result<OrderStatus, OrderError> {
        self.pay_held(user, id, gateway, Duration::ZERO).await
    }

    /// As [`Engine::pay`], for a pay the server itself held back for `held` after it
    /// arrived (a pacing rule on the pay route): it is in time if it arrived before its
    /// order's deadline. The expiry's grace covers the hold (`set_payment_wait_max`).
    pub async fn pay_held(
        self: &Arc<Self>,
        user: &UserId,
        id: OrderId,
        gateway: Arc<dyn PaymentGateway>,
        held: Duration,
    ) -> Result<OrderStatus, OrderError> {
        let order = self.order(&Actor::Shopper(user.clone()), id).await?;
        let arrived_ms = self
            .now_ms()
            .saturating_sub(i64::try_from(held.as_millis()).unwrap_or(i64::MAX));
        match order.status {
            OrderStatus::Paid => return Ok(OrderStatus::Paid),
            OrderStatus::Cancelled => return Err(OrderError::Cancelled),
            OrderStatus::Expired => return Err(OrderError::Expired),
            OrderStatus::PendingPayment if arrived_ms >= order.expires_at_ms => {
                return Err(OrderError::Expired);
            }
            OrderStatus::PendingPayment => {}
        }
        self.shared.use_payments(&gateway);
        // Durably noted before the provider is called, and only while the order is
        // pending: a close after this finds the note and refunds, and if this process
        // dies between the charge and its record, the next start still finds it. No
        // note, no charge.
        match self
            .ledger(WriteOp::ChargeAttempt {
                order_id: id,
                amount: order.amount,
                at_ms: self.now_ms(),
            })
            .await?
        {
            OpOutcome::Written => {}
            OpOutcome::Refused {
                current: OrderStatus::Paid,
            } => return Ok(OrderStatus::Paid),
            OpOutcome::Refused {
                current: OrderStatus::Cancelled,
            } => return Err(OrderError::Cancelled),
            OpOutcome::Refused { .. } => return Err(OrderError::Expired),
            _ => return Err(OrderError::NotFound),
        }
        // From the charge on, the work runs in its own task: a client that hangs up must
        // not leave money taken and the order unpaid.
        let engine = self.clone();
        tokio::spawn(async move {
            let key = id.to_string();
            // A decline, an open breaker or a throttled call charged nothing now, but an
            // earlier pay of the order that timed out may have: the ledger entry stays
            // until the order is paid or closes (then a refund finds out).
            gateway
                .charge(&key, order.amount)
                .await
                .map_err(|error| match error {
                    PaymentError::Timeout => {
                        // The charge may still land. If the order closed while it was
                        // out, its refund (started by the close) waits for it from now.
                        engine.refund_if_closed(id, order.amount);
                        OrderError::PaymentTimeout
                    }
                    PaymentError::Declined(reason) => OrderError::PaymentFailed(reason),
                    PaymentError::CircuitOpen { retry_after_ms } => {
                        OrderError::PaymentCircuitOpen(retry_after_ms)
                    }
                    PaymentError::Throttled { retry_after_ms } => {
                        OrderError::PaymentThrottled(retry_after_ms)
                    }
                    PaymentError::Unavailable(reason) => {
                        // Sent, but its outcome unknown: a connection lost after the
                        // request went out, or a 5xx (a gateway in front of the provider
                        // may answer 502/504 while the provider goes on charging). Owed
                        // the same watch as a timeout.
                        engine.refund_if_closed(id, order.amount);
                        OrderError::PaymentFailed(PaymentError::Unavailable(reason).to_string())
                    }
                    other => OrderError::PaymentFailed(other.to_string()),
                })?;
            match engine.transition(id, OrderEvent::Pay, true).await? {
                TransitionResult::Applied | TransitionResult::Refused(OrderStatus::Paid) => {
                    engine.shared.settle_charge(id);
                    Ok(OrderStatus::Paid)
                }
                TransitionResult::Refused(status) => {
                    // Charged, but a cancel or the expiry came first. The close found this
                    // pay's ledger entry and refunds in the background, but if the charge
                    // took longer than that refund's patience, the refund may have settled
                    // the entry on `NotCharged` already: the refund owed is noted again
                    // (durably, before anything else), and made here before the answer
                    // (the provider refunds a key once), in the background if it fails.
                    let registered = engine.shared.note_late_charge(id, order.amount).await;
                    match gateway.refund(&key, order.amount).await {
                        Ok(()) => {
                            if registered.is_some() {
                                let mut refunding = engine.shared.refunding.lock();
                                engine.shared.end_refund(&mut refunding, id, true);
                            }
                            // Else the refund already running asks again and settles.
                        }
                        Err(error) => {
                            tracing::warn!(order_id = %id, %error, "refund after a lost pay race failed; retried in the background, then by the ledger's sweep");
                            if let Some(registered) = registered {
                                engine.shared.spawn_refund(id, order.amount, registered);
                            }
                        }
                    }
                    Err(match status {
                        OrderStatus::Cancelled => OrderError::Cancelled,
                        _ => OrderError::Expired,
                    })
                }
                TransitionResult::NotFound => Err(OrderError::NotFound),
            }
        })
        .await
        .map_err(|_| OrderError::Unavailable)?
    }

    /// In the background: if the order is closed now, notes the refund owed in the
    /// charge ledger and refunds (or keeps refunding) the charge a pay whose outcome is
    /// unknown (timed out, lost its connection, answered 5xx) may still land.
    fn refund_if_closed(&self, id: OrderId, amount: Cents) {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            // A read that fails is tried again for a while: given up, a charge landing
            // after the close's refund settled the ledger entry would go unrefunded.
            let mut delay = std::time::Duration::from_millis(250);
            for _ in 0..8 {
                match shared.store.order(id).await {
                    Ok(Some(order)) => {
                        if !order.status.holds_stock() {
                            shared.owe_refund(id, amount);
                        }
                        return;
                    }
                    Ok(None) => return,
                    Err(_) => {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(REFUND_RETRY_MAX);
                    }
                }
            }
            tracing::warn!(order_id = %id, "could not read the order after a charge of unknown outcome; a refund it may be owed is left to the ledger");
        });
    }

    /// Writes a charge-ledger entry through the writer and answers what the store did.
    /// A pay outranks purchases, so it waits for room in the queue, but at most
    /// `LEDGER_QUEUE_WAIT` (`Overloaded`); `Unavailable` when the commit failed.
    async fn ledger(&self, op: WriteOp) -> Result<OpOutcome, OrderError> {
        let (reply, answer) = oneshot::channel();
        tokio::time::timeout(LEDGER_QUEUE_WAIT, self.jobs.send(Job::Ledger { op, reply }))
            .await
            .map_err(|_| OrderError::Overloaded)?
            .map_err(|_| OrderError::Unavailable)?;
        answer
            .await
            .map_err(|_| OrderError::Unavailable)?
            .map_err(|_| OrderError::Unavailable)
    }

    /// The provider refunds go through, for refunds owed from before this start (the
    /// charge ledger's closed orders), made at once by the ledger's sweep. A pay passes
    /// its provider too; call this at start so owed refunds do not wait for the first
    /// pay.
    pub fn use_payments(&self, gateway: Arc<dyn PaymentGateway>) {
        self.shared.use_payments(&gateway);
    }

    /// Refunds of closed unpaid orders started and not yet finished (for tests).
    #[doc(hidden)]
    pub fn refunds_open(&self) -> usize {
        self.shared
            .refunds_open
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Cancels a pending order and returns its stock. Cancelling twice is not an error.
    ///
    /// Once the payment window is over the order can only expire (pay already answers
    /// `Expired` then, and the writer expires it a grace later, after charges begun in
    /// time could finish): a cancel in that grace expires it at once and answers
    /// `Expired`, so no shopper is told "expired" about an order that ends "cancelled".
    pub async fn cancel(&self, actor: &Actor, id: OrderId) -> Result<OrderStatus, OrderError> {
        let order = self.order(actor, id).await?;
        let window_over = self.now_ms() >= order.expires_at_ms;
        let event = if window_over {
            OrderEvent::Expire
        } else {
            OrderEvent::Cancel
        };
        match self.transition(id, event, false).await? {
            TransitionResult::Applied if window_over => Err(OrderError::Expired),
            TransitionResult::Applied | TransitionResult::Refused(OrderStatus::Cancelled) => {
                Ok(OrderStatus::Cancelled)
            }
            TransitionResult::Refused(OrderStatus::Paid) => Err(OrderError::Paid),
            TransitionResult::Refused(_) => Err(OrderError::Expired),
            TransitionResult::NotFound => Err(OrderError::NotFound),
        }
    }

    /// Expires every pending order whose deadline (plus grace) has passed, now.
    /// The writer also does this on its own every `expiry_tick_ms`.
    pub async fn expire_due(&self) -> Result<(), OrderError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job::ExpireDue { reply })
            .map_err(|_| OrderError::Overloaded)?;
        answer.await.map_err(|_| OrderError::Unavailable)
    }

    /// Counts the sale's units from durable orders. The writer reads the in-memory stock
    /// and pins a store snapshot between two batches, so both describe one instant; the
    /// counting itself runs outside the writer.
    pub async fn audit(&self, sale_id: SaleId) -> Result<Option<Audit>, OrderError> {
        if self.shared.sale(sale_id).is_none() {
            return Ok(None);
        }
        // Past the bound, refused at once: a further audit would have the writer wait
        // for a connection an earlier one holds while it counts, and every purchase
        // with it.
        let permit = self
            .audits
            .clone()
            .try_acquire_owned()
            .map_err(|_| OrderError::AuditsBusy)?;
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job::Audit {
                sale_id,
                reply,
                permit,
            })
            .map_err(|_| OrderError::Overloaded)?;
        answer
            .await
            .map_err(|_| OrderError::Unavailable)?
            .map(Some)
            .map_err(|_| OrderError::Unavailable)
    }
}

/// Where a gate's take answers the purchase that asked for it. The take's task hands the
/// units back itself when nobody is there to be told; but a purchase whose future is
/// dropped after the answer arrived and before it was read would leave them taken,
/// with nobody to hand them back: dropped unread, this hands back what the answer took.
struct UnreadTake {
    told: oneshot::Receiver<Result<GateCount, GateRefusal>>,
    read: bool,
    gate: Arc<dyn StockGate>,
    sale: Arc<SaleState>,
    user: UserId,
    units: u32,
}

impl Drop for UnreadTake {
    fn drop(&mut self) {
        if self.read {
            return;
        }
        // Closed first, so an answer is either here now or refused to the task (which
        // then hands the units back itself): none lands unread after this.
        self.told.close();
        let Ok(Ok(count)) = self.told.try_recv() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(sale = %self.sale.record.id, units = self.units, "units taken in the stock gate for a purchase dropped outside a runtime");
            return;
        };
        let (gate, sale, user, units) = (
            self.gate.clone(),
            self.sale.clone(),
            self.user.clone(),
            self.units,
        );
        runtime.spawn(async move {
            sale.return_unread_take(&*gate, &user, units, count).await;
        });
    }
}

/// Settles a key still held by a purchase that never reached the writer (its future was
/// dropped): retries of the key would otherwise wait for an answer that never comes.
struct KeyHolder<'a> {
    shared: &'a Shared,
    user: &'a UserId,
    key: &'a IdempotencyKey,
    armed: std::sync::atomic::AtomicBool,
}

impl KeyHolder<'_> {
    fn disarm(&self) {
        self.armed
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for KeyHolder<'_> {
    fn drop(&mut self) {
        if self.armed.load(std::sync::atomic::Ordering::Relaxed) {
            self.shared
                .settle(self.user, self.key, Err(PurchaseError::Unavailable));
        }
    }
}

/// Units a buyer waits for in the next lease; uncounted when it stops waiting, however
/// it stops.
struct Waiting<'a> {
    sale: &'a SaleState,
    units: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut inner = self.sale.inner.lock();
        inner.lease.waiting = inner.lease.waiting.saturating_sub(self.units);
    }
}

enum Step<'a> {
    Refuse(PurchaseError),
    Taken {
        refill: bool,
    },
    WaitForLease {
        refilled: tokio::sync::futures::Notified<'a>,
        ask: bool,
    },
}

enum Seen {
    New,
    Done(Placed),
    InFlight(oneshot::Receiver<Outcome>),
}

/// The answer to a repeated request from the order its key names: the order, if the
/// request is the same (sale and quantity); else the key is reused.
fn replayed(
    order: &OrderRecord,
    sale_id: SaleId,
    quantity: Quantity,
) -> Result<Purchase, PurchaseError> {
    if order.sale_id == sale_id && order.quantity == quantity {
        Ok(Purchase {
            placed: Placed::of(order),
            replay: true,
        })
    } else {
        Err(PurchaseError::KeyReused)
    }
}

enum Attempt {
    Answer(Result<Purchase, PurchaseError>),
    RetryAfterDuplicateFailed,
}

impl PurchaseError {
    fn metric_label(&self) -> &'static str {
        match self {
            PurchaseError::SaleNotFound => "sale_not_found",
            PurchaseError::NotStarted => "not_started",
            PurchaseError::Ended => "ended",
            PurchaseError::SoldOut { .. } => "sold_out",
            PurchaseError::LimitExceeded { .. } | PurchaseError::ClosedLimitExceeded { .. } => {
                "limit_exceeded"
            }
            PurchaseError::KeyReused => "idempotency_key_reused",
            PurchaseError::Overloaded => "overloaded",
            PurchaseError::Unavailable => "unavailable",
            PurchaseError::CircuitOpen { .. } => "circuit_open",
        }
    }
}

/// Every `outcome` of `stampede_purchases_total`: a purchase's own, then
/// `PurchaseError::metric_label`'s.
const PURCHASE_OUTCOMES: [&str; 11] = [
    "placed",
    "replay",
    "sale_not_found",
    "not_started",
    "ended",
    "sold_out",
    "limit_exceeded",
    "idempotency_key_reused",
    "overloaded",
    "unavailable",
    "circuit_open",
];

/// Counts a purchase's `outcome`, through a counter registered once per process:
/// looking it up by name and label on every purchase cost an allocation and a hash each
/// time.
fn count_purchase(outcome: &'static str) {
    // Built on the first purchase, once the process has its recorder.
    static COUNTERS: std::sync::OnceLock<Vec<metrics::Counter>> = std::sync::OnceLock::new();
    let counters = COUNTERS.get_or_init(|| {
        PURCHASE_OUTCOMES
            .iter()
            .map(|&outcome| metrics::counter!("stampede_purchases_total", "outcome" => outcome))
            .collect()
    });
    match PURCHASE_OUTCOMES.iter().position(|&known| known == outcome) {
        Some(index) => counters[index].increment(1),
        None => {
            debug_assert!(
                false,
                "purchase outcome {outcome} is missing from PURCHASE_OUTCOMES"
            );
            metrics::counter!("stampede_purchases_total", "outcome" => outcome).increment(1);
        }
    }
}

/// How long a purchase waits for a lease when its node's runs short.
const LEASE_WAIT: Duration = Duration::from_secs(2);

pub(crate) fn duration_ms(ms: u64) -> Duration {
    Duration::from_millis(ms.max(1))
}

/// The state an opening engine folds the store's orders into, one at a time as they are
/// read (`Store::load`), so the orders themselves are never all in memory.
struct Loaded<'a> {
    shared: &'a Shared,
    now_ms: i64,
    sales: Vec<SaleRecord>,
    /// Sales whose answers are no longer kept (`answers_kept_until`): their orders
    /// rebuild stock and shoppers' order lists, not idempotency answers or per-shopper
    /// counts (`forget_ended_sales` has removed both from a running engine).
    retired: std::collections::HashSet<SaleId>,
    held_units: HashMap<SaleId, u64>,
    held_by_user: HashMap<SaleId, FastMap<UserId, u32>>,
    closed_by_user: HashMap<SaleId, FastMap<UserId, u32>>,
    expiries: Vec<(i64, OrderId)>,
}

impl Rebuild for Loaded<'_> {
    fn catalog(&mut self, products: Vec<ProductRecord>, sales: Vec<SaleRecord>) {
        let mut known = self.shared.products.write();
        for product in products {
            known.insert(
                product.sku.clone(),
                Arc::new(Mutex::new(ProductState { record: product })),
            );
        }
        self.retired = sales
            .iter()
            .filter(|sale| self.shared.answers_kept_until(sale) <= self.now_ms)
            .map(|sale| sale.id)
            .collect();
        self.sales = sales;
    }

    fn order(&mut self, order: OrderRecord) {
        let retired = self.retired.contains(&order.sale_id);
        if !retired && matches!(order.status, OrderStatus::Cancelled | OrderStatus::Expired) {
            let closed = self
                .closed_by_user
                .entry(order.sale_id)
                .or_default()
                .entry(order.user_id.clone())
                .or_default();
            *closed = (*closed + 1).min(CLOSED_ORDERS_PER_SHOPPER_MAX);
        }
        if order.status.holds_stock() {
            *self.held_units.entry(order.sale_id).or_default() += u64::from(order.quantity.get());
            if !retired {
                *self
                    .held_by_user
                    .entry(order.sale_id)
                    .or_default()
                    .entry(order.user_id.clone())
                    .or_default() += order.quantity.get();
            }
        }
        if order.status == OrderStatus::PendingPayment {
            self.expiries.push((order.expires_at_ms, order.id));
        }
        self.shared.remember_order(&order.user_id, order.id);
        if !retired {
            self.shared.settle(
                &order.user_id,
                &order.idempotency_key,
                Ok(Placed::of(&order)),
            );
        }
    }
}

/// Every `EngineConfig::charge_sweep_ms`, and when woken (`Shared::sweep_now`), settles
/// the charge ledger's entries whose orders are no longer pending
/// (`Store::charges_to_settle`): a paid order's entry is removed, a closed order's is
/// refunded unless this node is refunding it already. These are the refunds a close
/// could not see (a consistent read on MySQL, isolated from a pay another node committed
/// meanwhile), that failed, that a node dying or a restart cut short, or that closed
/// before the provider was known; and the entries a crash left after a pay. Only once
/// the provider is known. Ends with the engine.
async fn sweep_charges(
    shared: std::sync::Weak<Shared>,
    now: Arc<tokio::sync::Notify>,
    every: std::time::Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = now.notified() => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.gateway.get().is_none() {
            continue;
        }
        match shared.store.charges_to_settle().await {
            Ok(entries) => {
                let mut room = true;
                for entry in entries {
                    match entry.status {
                        OrderStatus::Paid => {
                            room = room && shared.settle_charge_if_room(entry.order_id);
                        }
                        OrderStatus::Cancelled | OrderStatus::Expired => {
                            shared.refund_if_charged(entry.order_id, entry.amount);
                        }
                        OrderStatus::PendingPayment => {}
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "could not read the charge ledger; the next sweep tries again");
            }
        }
    }
}
