//! The single writer: the only code that changes durable state.
//!
//! It takes up to `batch_size_max` jobs from the bounded queue, turns them into one
//! `Store::commit` (one transaction, one fsync), and only after the commit returns does
//! it release answers and apply the effects that depend on durability (stock handed
//! back by a cancel or an expiry, sales becoming visible). Because it is the only
//! writer, "pay", "cancel" and "expire" of one order are decided here, in queue order:
//! exactly one of them wins.
//!
//! Back of the envelope: an fsync of the SQLite WAL costs ~0.2 ms here, an order row
//! ~1-3 µs of CPU to bind and insert. At 1,024 orders per batch the fsync is <10% of
//! the writer's time; at light load batches are small and latency is one fsync.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stampede_types::{OrderEvent, OrderId, OrderStatus, SaleId};
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot};
use tokio::time::MissedTickBehavior;

/// After a node found a sale's pool empty, how long it answers sold out before asking
/// again (a dead node's lease may be reclaimed, an idle one returned).
const LEASE_RETRY_MS: i64 = 500;

use crate::engine::{
    AdminError, Audit, FastSet, Outcome, Placed, PurchaseError, SaleState, Shared, duration_ms,
};
use crate::store::{OpOutcome, OrderRecord, ProductRecord, SaleRecord, StoreError, WriteOp};

pub(crate) enum Job {
    Purchase {
        order: OrderRecord,
        sale: Arc<SaleState>,
        reply: oneshot::Sender<Outcome>,
        /// When it joined the queue: the writer reports how long purchases waited for it.
        queued_at: Instant,
    },
    /// Answered `Err(None)` when the commit failed, `Err(Some(_))` when another node's
    /// product or sale came first (a cluster store's conflict): a client error.
    CreateProduct {
        record: ProductRecord,
        reply: oneshot::Sender<Result<(), Option<AdminError>>>,
    },
    CreateSale {
        record: SaleRecord,
        reply: oneshot::Sender<Result<(), Option<AdminError>>>,
    },
    Transition {
        order_id: OrderId,
        event: OrderEvent,
        reply: oneshot::Sender<Result<TransitionResult, ()>>,
    },
    ExpireDue {
        reply: oneshot::Sender<()>,
    },
    /// An entry of the charge ledger written or removed (`WriteOp::ChargeAttempt`,
    /// `WriteOp::ChargeSettled`), answered with what the store did; `Err(())` when the
    /// commit failed.
    Ledger {
        op: WriteOp,
        reply: oneshot::Sender<Result<OpOutcome, ()>>,
    },
    Audit {
        sale_id: SaleId,
        reply: oneshot::Sender<Result<Audit, ()>>,
        /// Its place among the audits counting (`AUDITS_AT_ONCE`): given back when its
        /// count is done or fails.
        permit: tokio::sync::OwnedSemaphorePermit,
    },
    /// Cluster only: lease more of the sale's stock for this node.
    Lease {
        sale: Arc<SaleState>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TransitionResult {
    Applied,
    Refused(OrderStatus),
    NotFound,
}

type AuditRequest = (
    SaleId,
    oneshot::Sender<Result<Audit, ()>>,
    tokio::sync::OwnedSemaphorePermit,
);

/// The receiver of the job queue belongs to the engine and outlives the writer's task,
/// which holds it through `jobs`. Dropping a tokio receiver drops the jobs queued, but
/// not one whose sender already had its permit and pushes it just after: that caller
/// would wait for an answer as long as the engine lives. So a writer stopped where it
/// stands (`Engine::crash`, a panic) closes and empties the queue as it is dropped, and
/// `Engine::crash` then waits out the stragglers.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    jobs: OwnedMutexGuard<mpsc::Receiver<Job>>,
    shutdown: oneshot::Receiver<()>,
    /// Pending orders by their `expires_at` (each is expired once the grace,
    /// `Shared::expiry_grace_ms`, has passed too). An order paid or cancelled
    /// leaves `pending` at once and its entry here is skipped when due; the heap is
    /// compacted whenever it holds more than twice `pending` (plus `EXPIRIES_SLACK`), so
    /// it stays bounded by the pending orders, themselves bounded by the stock of all
    /// sales, whatever the churn of buying and cancelling.
    expiries: BinaryHeap<Reverse<(i64, OrderId)>>,
    /// The orders this writer knows to be pending (its own, and those it adopted).
    pending: FastSet<OrderId>,
    /// When the writer last tried a probe write after failed commits.
    last_probe: Option<Instant>,
    /// A reclaim removed nodes (or failed, perhaps after removing some): their pending
    /// orders are this writer's to expire, and it reads them at every cluster tick until
    /// a read succeeds. Without the retry one failed read left them pending for good,
    /// their units held and a charge for them never refunded.
    adopt_pending: bool,
}

/// While commits fail and nothing is queued, a probe write at most this often: a node
/// that is not ready gets no purchases, so without it a store that healed would never
/// see the commit that makes the node ready again.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Entries the expiry heap may hold beyond twice the pending orders before it is
/// compacted.
const EXPIRIES_SLACK: usize = 256;

/// How often the writer looks for ended sales whose idempotency answers may leave memory.
const FORGET_EVERY: Duration = Duration::from_secs(1);

/// The setting the probe writes (the time of the probe).
pub const WRITER_PROBE_KEY: &str = "writer_probe";

fn target(event: OrderEvent) -> OrderStatus {
    OrderStatus::PendingPayment
        .apply(event)
        .expect("pending orders accept every event")
}

impl Drop for Writer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A bug, not a store's answer: whatever the panic interrupted, memory may
            // no longer match the store. Halted, the node fails `/healthz` and its
            // orchestrator restarts it, which rebuilds from what is durable; its queue's
            // purchases are refused below instead of waiting for a writer that is gone.
            tracing::error!(
                "the writer panicked; halting: restart the node to rebuild its state from the store"
            );
            self.shared
                .halted
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // A writer that ended normally closed and emptied the queue already.
        self.jobs.close();
        while self.jobs.try_recv().is_ok() {}
    }
}

impl Writer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        jobs: OwnedMutexGuard<mpsc::Receiver<Job>>,
        shutdown: oneshot::Receiver<()>,
        expiries: Vec<(i64, OrderId)>,
    ) -> Self {
        Writer {
            shared,
            jobs,
            shutdown,
            pending: expiries.iter().map(|(_, id)| *id).collect(),
            expiries: expiries.into_iter().map(Reverse).collect(),
            last_probe: None,
            adopt_pending: false,
        }
    }

    /// After failed commits, with nothing to commit: at most every `PROBE_EVERY`, an
    /// empty batch through the same commit path the orders take, then a small durable
    /// write (a setting). On a server database the batch is the writer's own connection
    /// (reconnected, holding the owner lock under our epoch, or, in a cluster, with the
    /// node's membership row) writing the batch stamp: a probe through any other
    /// connection could call the node ready while its writer still cannot commit. On
    /// SQLite an empty batch writes no page, and the setting, through the same write
    /// thread, is what finds a full disk. When both land the node is ready again; a
    /// probe that finds the node fenced halts it, as a batch would (an empty batch whose
    /// `COMMIT` is lost is not resolved, so it never reads as indeterminate).
    async fn probe_after_failures(&mut self, now_ms: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.shared.commit_failures_in_a_row.load(Relaxed) == 0
            || self.last_probe.is_some_and(|t| t.elapsed() < PROBE_EVERY)
        {
            return;
        }
        self.last_probe = Some(Instant::now());
        let store = &self.shared.store;
        let probed = async {
            store.commit(&[]).await?;
            store
                .save_setting(WRITER_PROBE_KEY, &now_ms.to_string())
                .await
        };
        match probed.await {
            Ok(()) => {
                self.shared.commit_failures_in_a_row.store(0, Relaxed);
                tracing::info!("a probe commit landed after failed commits; ready again");
            }
            Err(error) if error.halts() => self.halt(&error),
            Err(error) => tracing::debug!(%error, "probe commit after failed commits failed"),
        }
    }

    pub(crate) async fn run(mut self) {
        let batch_size_max = self.shared.config.batch_size_max;
        let mut tick = tokio::time::interval(duration_ms(self.shared.config.expiry_tick_ms));
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let cluster = self.shared.cluster;
        let mut cluster_tick =
            tokio::time::interval(duration_ms(self.shared.config.cluster_tick_ms));
        cluster_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let upkeep_every = duration_ms(self.shared.config.cluster_tick_ms);
        let mut next_upkeep = Instant::now() + upkeep_every;
        let mut closing = false;
        let mut batch = Vec::with_capacity(batch_size_max);
        let mut next_forget = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = &mut self.shutdown, if !closing => {
                    // No new jobs; the ones already queued are still committed below.
                    closing = true;
                    self.jobs.close();
                    continue;
                }
                job = self.jobs.recv() => match job {
                    Some(job) => batch.push(job),
                    None => break,
                },
                _ = tick.tick() => {}
                _ = cluster_tick.tick(), if cluster => {
                    next_upkeep = Instant::now() + upkeep_every;
                    self.cluster_upkeep().await;
                    if self.is_halted() {
                        self.refuse_the_rest(&mut batch).await;
                        break;
                    }
                    continue;
                }
            }
            // Orders falling due keep at least half the batch: a queue that stays full
            // never starves the expiry (stock going back), and the transaction stays
            // within `batch_size_max` operations with them.
            let expiry_due = self
                .expiries
                .peek()
                .is_some_and(|Reverse((expires_at_ms, _))| {
                    *expires_at_ms <= self.shared.clock.now_ms() - self.shared.expiry_grace_ms()
                });
            let room = if expiry_due {
                (batch_size_max / 2).max(1)
            } else {
                batch_size_max
            };
            while batch.len() < room {
                match self.jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.process(&mut batch).await;
            if Instant::now() >= next_forget {
                // Once a second: the answers of sales that ended long enough ago leave
                // memory, walked off this task so no commit waits for it.
                next_forget = Instant::now() + FORGET_EVERY;
                if self.shared.has_answers_to_forget() {
                    let shared = self.shared.clone();
                    tokio::task::spawn_blocking(move || shared.forget_ended_sales());
                }
            }
            if cluster && !self.is_halted() && Instant::now() >= next_upkeep {
                // A queue that never empties must not starve the heartbeat, the reclaim
                // of dead nodes' leases or the catalogue.
                next_upkeep = Instant::now() + upkeep_every;
                self.cluster_upkeep().await;
            }
            if self.is_halted() {
                self.refuse_the_rest(&mut batch).await;
                break;
            }
        }
        if cluster && !self.is_halted() {
            // A clean stop hands every lease back at once instead of after the time to
            // live, so the other nodes can sell it.
            match self.shared.store.leave().await {
                Ok(()) => tracing::info!("left the cluster; leases returned"),
                Err(error) => {
                    tracing::warn!(%error, "could not leave the cluster; the leases return when the node is declared dead")
                }
            }
        }
        tracing::info!("writer drained and stopped");
    }

    /// After a halt: nothing queued behind it was written; undo and refuse it all.
    async fn refuse_the_rest(&mut self, batch: &mut Vec<Job>) {
        self.jobs.close();
        while let Some(job) = self.jobs.recv().await {
            batch.push(job);
        }
        self.failed(batch);
    }

    fn is_halted(&self) -> bool {
        self.shared
            .halted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn halt(&self, error: &StoreError) {
        tracing::error!(%error, "the writer halts: restart the node to rebuild its state from the store");
        self.shared
            .halted
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Grants the lease requests of this batch, before its commit, so buyers waiting for
    /// stock are answered by the same batch.
    async fn lease(&mut self, batch: &mut Vec<Job>) {
        let mut leases = Vec::new();
        batch.retain(|job| match job {
            Job::Lease { sale } => {
                leases.push(sale.clone());
                false
            }
            _ => true,
        });
        for sale in leases {
            if self.is_halted() {
                sale.inner.lock().lease.asked = false;
                sale.refilled.notify_waiters();
                continue;
            }
            let now_ms = self.shared.clock.now_ms();
            let wanted = sale.inner.lock().lease.waiting;
            let result = self
                .shared
                .store
                .lease(sale.record.id, wanted, self.shared.config.lease_max)
                .await;
            {
                let mut inner = sale.inner.lock();
                inner.lease.asked = false;
                match &result {
                    Ok(grant) if grant.units > 0 => {
                        inner.remaining += grant.units;
                        inner.lease.last_grant = grant.units;
                        inner.lease.dry_until_ms = 0;
                        inner.lease.last_take_ms = now_ms;
                    }
                    // Nothing left to lease (or the database failed): sold out here until
                    // another node returns stock or a dead node's lease is reclaimed.
                    _ => inner.lease.dry_until_ms = now_ms + LEASE_RETRY_MS,
                }
                if let Ok(grant) = &result {
                    inner.unsold_hint = grant.unleased + inner.remaining + inner.in_flight;
                }
            }
            sale.refilled.notify_waiters();
            match result {
                Ok(grant) => {
                    metrics::counter!("stampede_lease_units_total").increment(grant.units);
                    metrics::counter!("stampede_leases_total").increment(1);
                }
                Err(error) => {
                    tracing::warn!(%error, sale_id = %sale.record.id, "lease failed");
                    if error.halts() {
                        self.halt(&error);
                    }
                }
            }
        }
    }

    /// Cluster upkeep, every `cluster_tick_ms`: heartbeat, reclaim dead nodes' leases
    /// (and adopt their pending orders' expiry), learn of products and sales created on
    /// other nodes, and return leases nobody is buying from.
    async fn cluster_upkeep(&mut self) {
        let store = self.shared.store.clone();
        if let Err(error) = store.heartbeat().await {
            tracing::warn!(%error, "heartbeat failed");
            if error.halts() {
                self.halt(&error);
                return;
            }
        }
        match store.reclaim().await {
            Ok(reclaimed) if reclaimed.nodes > 0 => {
                tracing::warn!(
                    nodes = reclaimed.nodes,
                    units = reclaimed.units,
                    "took over from nodes that left or stopped heartbeating: their leases and their pending orders' expiry"
                );
                metrics::counter!("stampede_nodes_reclaimed_total").increment(reclaimed.nodes);
                metrics::counter!("stampede_lease_units_reclaimed_total")
                    .increment(reclaimed.units);
                self.adopt_pending = true;
                for sale in self.shared.sales.read().values() {
                    sale.inner.lock().lease.dry_until_ms = 0;
                }
            }
            Ok(_) => {}
            Err(error) => {
                // Each node's removal commits on its own: one may have been removed
                // before the error, and its pending orders are ours now.
                tracing::warn!(%error, "reclaiming dead nodes' leases failed");
                self.adopt_pending = true;
            }
        }
        if self.adopt_pending {
            match store.pending_orders().await {
                Ok(pending) => {
                    self.adopt_pending = false;
                    for (id, expires_at_ms) in pending {
                        // Every pending order of the database: ours are known already.
                        if self.pending.insert(id) {
                            self.expiries.push(Reverse((expires_at_ms, id)));
                        }
                    }
                    // Refunds the removed nodes may not have made (idempotent at the
                    // provider if they did, or if another node is making them): the
                    // ledger's sweep, now.
                    self.shared.sweep_now.notify_one();
                }
                Err(error) => tracing::warn!(
                    %error,
                    "reading the pending orders of removed nodes failed; trying again next tick"
                ),
            }
        }
        match store.catalog().await {
            Ok(catalog) => self.learn(catalog),
            Err(error) => tracing::warn!(%error, "reading the catalogue failed"),
        }
        let now_ms = self.shared.clock.now_ms();
        let idle_ms = self.shared.config.lease_idle_ms;
        let sales: Vec<Arc<SaleState>> = self.shared.sales.read().values().cloned().collect();
        for sale in sales {
            let units = {
                let mut inner = sale.inner.lock();
                let idle = now_ms - inner.lease.last_take_ms > idle_ms;
                if inner.remaining == 0 || !(idle || now_ms >= sale.record.ends_at_ms) {
                    continue;
                }
                std::mem::take(&mut inner.remaining)
            };
            if let Err(error) = store.release(sale.record.id, units).await {
                // The release may have landed (a lost COMMIT answer): the units stay out
                // of memory, so this node never sells more than its lease in the
                // database. If it did not land they wait in the lease until this node
                // leaves or is reclaimed.
                tracing::warn!(%error, sale_id = %sale.record.id, units, "returning an idle lease failed; its units stay unsold until the node leaves");
                if error.halts() {
                    self.halt(&error);
                    return;
                }
            }
        }
    }

    /// Adds products and sales other nodes created, and refreshes what the database says
    /// is left of each sale.
    fn learn(&self, catalog: crate::store::Catalog) {
        {
            let mut products = self.shared.products.write();
            for record in catalog.products {
                match products.get(&record.sku) {
                    Some(known) => known.lock().record.available = record.available,
                    None => {
                        products.insert(
                            record.sku.clone(),
                            Arc::new(parking_lot::Mutex::new(crate::engine::ProductState {
                                record,
                            })),
                        );
                    }
                }
            }
        }
        let mut sales = self.shared.sales.write();
        for (record, unsold) in catalog.sales {
            match sales.get(&record.id) {
                Some(known) => known.inner.lock().unsold_hint = unsold,
                None => {
                    let id = record.id;
                    sales.insert(
                        id,
                        Arc::new(SaleState::new(
                            record,
                            0,
                            Default::default(),
                            Default::default(),
                            unsold,
                            None,
                        )),
                    );
                }
            }
        }
    }

    async fn process(&mut self, batch: &mut Vec<Job>) {
        if self.shared.cluster {
            self.lease(batch).await;
        }
        if let Some(gate) = self.shared.gate.clone() {
            // A new sale's stock goes into the gate before the sale becomes visible. A
            // gate that cannot take it fails the creation (the commit below is skipped).
            let mut refused = Vec::new();
            for (index, job) in batch.iter().enumerate() {
                if let Job::CreateSale { record, .. } = job
                    && let Err(error) = gate.load(record.id, record.quantity, &[]).await
                {
                    tracing::error!(%error, sale_id = %record.id, "could not load a new sale into the stock gate");
                    refused.push(index);
                }
            }
            for index in refused.into_iter().rev() {
                let job = batch.remove(index);
                self.failed(&mut vec![job]);
            }
        }
        let now_ms = self.shared.clock.now_ms();
        let mut ops = Vec::with_capacity(batch.len());
        let picked_up = Instant::now();
        let queue_wait = metrics::histogram!("stampede_writer_queue_wait_seconds");
        for job in batch.iter() {
            match job {
                Job::Purchase {
                    order, queued_at, ..
                } => {
                    queue_wait.record(picked_up.saturating_duration_since(*queued_at));
                    ops.push(WriteOp::InsertOrder(order.clone()))
                }
                Job::CreateProduct { record, .. } => {
                    ops.push(WriteOp::InsertProduct(record.clone()))
                }
                Job::CreateSale { record, .. } => ops.push(WriteOp::InsertSale(record.clone())),
                Job::Transition {
                    order_id, event, ..
                } => ops.push(WriteOp::Transition {
                    order_id: *order_id,
                    to: target(*event),
                    at_ms: now_ms,
                }),
                Job::Ledger { op, .. } => ops.push(op.clone()),
                Job::ExpireDue { .. } | Job::Audit { .. } | Job::Lease { .. } => {}
            }
        }
        let n_job_ops = ops.len();
        let mut expiring = Vec::new();
        // What the jobs left of `batch_size_max`, and one at least (a batch of one job
        // still expires one order).
        let expiries_max = self
            .shared
            .config
            .batch_size_max
            .saturating_sub(n_job_ops)
            .max(1);
        // The heap holds each pending order's `expires_at`; the grace is added here, so
        // a grace that grows (a pacing rule on the pay route or the payment provider)
        // holds back orders already waiting too.
        let expired_before_ms = now_ms - self.shared.expiry_grace_ms();
        while expiring.len() < expiries_max {
            match self.expiries.peek() {
                Some(Reverse((expires_at_ms, _))) if *expires_at_ms <= expired_before_ms => {
                    let Reverse((expires_at_ms, order_id)) = self.expiries.pop().expect("peeked");
                    if !self.pending.contains(&order_id) {
                        continue; // paid or cancelled since
                    }
                    ops.push(WriteOp::Transition {
                        order_id,
                        to: OrderStatus::Expired,
                        at_ms: now_ms,
                    });
                    expiring.push((expires_at_ms, order_id));
                }
                _ => break,
            }
        }

        let outcomes = if ops.is_empty() {
            self.probe_after_failures(now_ms).await;
            if self.is_halted() {
                // The probe found the node fenced: nothing in this batch (an audit) is
                // answered from memory that no longer matches the store.
                Err(StoreError::Unavailable("the writer has halted".into()))
            } else {
                Ok(Vec::new())
            }
        } else {
            let started = Instant::now();
            let result = self.shared.store.commit(&ops).await;
            let elapsed = started.elapsed();
            if let Some(breaker) = self.shared.commit_breaker.get() {
                breaker.record(elapsed, result.is_ok());
            }
            metrics::histogram!("stampede_writer_commit_seconds").record(elapsed.as_secs_f64());
            metrics::histogram!("stampede_writer_batch_ops").record(ops.len() as f64);
            result
        };

        match outcomes {
            Ok(outcomes) => {
                if !ops.is_empty() {
                    // Only a commit that landed says the store takes writes again; an
                    // idle tick with nothing to commit says nothing.
                    self.shared
                        .commit_failures_in_a_row
                        .store(0, std::sync::atomic::Ordering::Relaxed);
                }
                assert_eq!(
                    outcomes.len(),
                    ops.len(),
                    "store answered a different number of ops"
                );
                let audits = self.committed(batch, &outcomes[..n_job_ops]);
                let mut n_expired = 0;
                for (outcome, (_, order_id)) in outcomes[n_job_ops..].iter().zip(&expiring) {
                    // Expired now, or found paid or cancelled (on another node): either
                    // way no longer pending.
                    self.pending.remove(order_id);
                    if let OpOutcome::Transitioned {
                        sale_id,
                        user_id,
                        quantity,
                        charge,
                    } = outcome
                    {
                        if let Some(sale) = self.shared.sale(*sale_id) {
                            sale.give_back(user_id, quantity.get(), false);
                        }
                        if let Some(amount) = charge {
                            self.shared.refund_if_charged(*order_id, *amount);
                        }
                        n_expired += 1;
                    }
                }
                metrics::counter!("stampede_orders_expired_total").increment(n_expired);
                self.compact_expiries();
                // Audits run after every effect of the batch is applied, so the durable
                // counts and the in-memory stock describe the same instant.
                for (sale_id, reply, permit) in audits {
                    self.audit(sale_id, reply, permit).await;
                }
            }
            Err(error) => {
                metrics::counter!("stampede_writer_commit_failures_total").increment(1);
                self.shared
                    .commit_failures_in_a_row
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.expiries.extend(expiring.into_iter().map(Reverse));
                if error.halts() {
                    // Before any answer goes out, so nobody sees a refusal from a node
                    // that still looks healthy.
                    self.halt(&error);
                }
                if let StoreError::Indeterminate(_) = error {
                    // The batch may have landed: its stock must stay taken. Its clients
                    // get 503; after a restart their keys answer whatever is durable.
                    tracing::error!(%error, n_ops = ops.len(), "batch outcome unknown; halting the writer");
                    self.abandoned(batch);
                } else {
                    tracing::error!(%error, n_ops = ops.len(), "batch commit failed; answering 503 and returning stock");
                    self.failed(batch);
                }
            }
        }
    }

    /// Drops the heap's entries of orders no longer pending once they are as many as the
    /// pending ones (plus some slack): amortised O(1) a push, and the heap never holds
    /// more than about twice the pending orders.
    fn compact_expiries(&mut self) {
        if self.expiries.len() > 2 * self.pending.len() + EXPIRIES_SLACK {
            let pending = &self.pending;
            self.expiries
                .retain(|Reverse((_, id))| pending.contains(id));
        }
        self.shared
            .expiry_entries
            .store(self.expiries.len(), std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("stampede_writer_expiry_entries").set(self.expiries.len() as f64);
    }

    /// Applies the effects of a committed batch and answers its jobs; returns the audits,
    /// to be answered once every effect is applied.
    fn committed(&mut self, batch: &mut Vec<Job>, outcomes: &[OpOutcome]) -> Vec<AuditRequest> {
        let mut audits = Vec::new();
        let mut outcomes = outcomes.iter();
        for job in batch.drain(..) {
            match job {
                Job::Purchase {
                    order, sale, reply, ..
                } => {
                    // On a cluster store, another node may have been first with this
                    // shopper's key or limit: the order was not inserted.
                    let refusal = match outcomes.next() {
                        Some(OpOutcome::Duplicate(existing)) => Some(
                            if existing.sale_id == order.sale_id
                                && existing.quantity == order.quantity
                            {
                                self.shared.remember_order(&order.user_id, existing.id);
                                Ok(Placed::of(existing))
                            } else {
                                Err(PurchaseError::KeyReused)
                            },
                        ),
                        Some(OpOutcome::OverLimit { held }) => {
                            Some(Err(PurchaseError::LimitExceeded {
                                limit: sale.record.per_user_limit,
                                held: *held,
                            }))
                        }
                        _ => None,
                    };
                    if let Some(answer) = refusal {
                        sale.give_back(&order.user_id, order.quantity.get(), true);
                        self.shared
                            .settle(&order.user_id, &order.idempotency_key, answer.clone());
                        let _ = reply.send(answer);
                        continue;
                    }
                    sale.inner.lock().in_flight -= u64::from(order.quantity.get());
                    let placed = Placed::of(&order);
                    self.shared
                        .settle(&order.user_id, &order.idempotency_key, Ok(placed.clone()));
                    self.shared.remember_order(&order.user_id, order.id);
                    let _ = reply.send(Ok(placed));
                    self.pending.insert(order.id);
                    self.expiries.push(Reverse((order.expires_at_ms, order.id)));
                }
                Job::CreateProduct { record, reply } => {
                    if let Some(OpOutcome::Conflict) = outcomes.next() {
                        // Another node created it first: ours was not written. Our
                        // record of it goes (its name and stock are the other node's);
                        // the next catalogue read brings the real one.
                        self.shared.products.write().remove(&record.sku);
                        let _ = reply.send(Err(Some(AdminError::SkuExists)));
                        continue;
                    }
                    let _ = reply.send(Ok(()));
                }
                Job::CreateSale { record, reply } => {
                    if let Some(OpOutcome::Conflict) = outcomes.next() {
                        // Another node's sale took the stock first: ours was not written.
                        // What this node believed available was stale: none is, until
                        // the next catalogue read says how much.
                        if let Some(product) = self.shared.products.read().get(&record.sku) {
                            product.lock().record.available = 0;
                        }
                        let _ =
                            reply.send(Err(Some(AdminError::InsufficientStock { available: 0 })));
                        continue;
                    }
                    // On a cluster store the stock sits in the sale's pool until leased.
                    // (and with an outside gate, in the gate: loaded before the commit).
                    let gate = self.shared.gate.clone();
                    let remaining = if self.shared.cluster || gate.is_some() {
                        0
                    } else {
                        record.quantity
                    };
                    let quantity = record.quantity;
                    let state = SaleState::new(
                        record,
                        remaining,
                        Default::default(),
                        Default::default(),
                        quantity,
                        gate,
                    );
                    self.shared
                        .sales
                        .write()
                        .insert(state.record.id, Arc::new(state));
                    let _ = reply.send(Ok(()));
                }
                Job::Transition {
                    order_id,
                    event,
                    reply,
                } => {
                    let outcome = outcomes.next().expect("one outcome per op");
                    if matches!(
                        outcome,
                        OpOutcome::Transitioned { .. } | OpOutcome::Refused { .. }
                    ) {
                        // Paid, cancelled or expired now, or already: not pending.
                        self.pending.remove(&order_id);
                    }
                    let result = match outcome {
                        OpOutcome::Transitioned {
                            sale_id,
                            user_id,
                            quantity,
                            charge,
                        } => {
                            if event != OrderEvent::Pay {
                                if let Some(sale) = self.shared.sale(*sale_id) {
                                    sale.give_back(user_id, quantity.get(), false);
                                }
                                if let Some(amount) = charge {
                                    self.shared.refund_if_charged(order_id, *amount);
                                }
                            }
                            TransitionResult::Applied
                        }
                        OpOutcome::Refused { current } => TransitionResult::Refused(*current),
                        _ => TransitionResult::NotFound,
                    };
                    let _ = reply.send(Ok(result));
                }
                Job::ExpireDue { reply } => {
                    let _ = reply.send(());
                }
                Job::Ledger { reply, .. } => {
                    let outcome = outcomes.next().expect("one outcome per op");
                    let _ = reply.send(Ok(outcome.clone()));
                }
                Job::Audit {
                    sale_id,
                    reply,
                    permit,
                } => audits.push((sale_id, reply, permit)),
                Job::Lease { sale } => {
                    sale.inner.lock().lease.asked = false;
                    sale.refilled.notify_waiters();
                }
            }
        }
        audits
    }

    /// Answers a batch whose commit may have landed: 503 to everyone, nothing undone.
    fn abandoned(&mut self, batch: &mut Vec<Job>) {
        self.refused(batch, false);
    }

    /// Answers a batch that was not written: its effects undone, 503 to everyone.
    fn failed(&mut self, batch: &mut Vec<Job>) {
        self.refused(batch, true);
    }

    /// Answers every job of `batch` with a failure; with `undo`, first hands back what
    /// each job reserved in memory (stock, a product's sku, a sale's units).
    fn refused(&mut self, batch: &mut Vec<Job>, undo: bool) {
        for job in batch.drain(..) {
            match job {
                Job::Purchase {
                    order, sale, reply, ..
                } => {
                    if undo {
                        sale.give_back(&order.user_id, order.quantity.get(), true);
                    }
                    self.shared.settle(
                        &order.user_id,
                        &order.idempotency_key,
                        Err(PurchaseError::Unavailable),
                    );
                    let _ = reply.send(Err(PurchaseError::Unavailable));
                }
                Job::CreateProduct { record, reply } => {
                    if undo {
                        self.shared.products.write().remove(&record.sku);
                    }
                    let _ = reply.send(Err(None));
                }
                Job::CreateSale { record, reply } => {
                    if undo && let Some(product) = self.shared.products.read().get(&record.sku) {
                        product.lock().record.available += record.quantity;
                    }
                    let _ = reply.send(Err(None));
                }
                Job::Transition { reply, .. } => {
                    let _ = reply.send(Err(()));
                }
                Job::Ledger { reply, .. } => {
                    let _ = reply.send(Err(()));
                }
                Job::ExpireDue { reply } => {
                    let _ = reply.send(());
                }
                Job::Audit { reply, .. } => {
                    let _ = reply.send(Err(()));
                }
                Job::Lease { sale } => {
                    sale.inner.lock().lease.asked = false;
                    sale.refilled.notify_waiters();
                }
            }
        }
    }

    /// Reads the in-memory stock and pins a durable snapshot at the same instant
    /// (between batches), then counts the snapshot in its own task: the writer goes on.
    async fn audit(
        &self,
        sale_id: SaleId,
        reply: oneshot::Sender<Result<Audit, ()>>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let Some(sale) = self.shared.sale(sale_id) else {
            let _ = reply.send(Err(()));
            return;
        };
        let pending = match self
            .shared
            .store
            .snapshot_tally(sale_id, sale.record.per_user_limit)
            .await
        {
            Ok(pending) => pending,
            Err(error) => {
                tracing::warn!(%sale_id, %error, "audit could not read the store");
                let _ = reply.send(Err(()));
                return;
            }
        };
        let (mut remaining_in_memory, in_flight) = {
            let inner = sale.inner.lock();
            (inner.remaining, inner.in_flight)
        };
        if let Some(gate) = &self.shared.gate {
            // The gate holds the stock: what it says is left, against the orders.
            match gate.remaining(sale_id).await {
                Ok(remaining) => remaining_in_memory = remaining,
                Err(error) => {
                    tracing::warn!(%sale_id, %error, "audit could not read the stock gate");
                    let _ = reply.send(Err(()));
                    return;
                }
            }
        }
        tokio::spawn(async move {
            // The count done (its snapshot's connection released), the next audit may
            // come in.
            let tally = pending.await;
            drop(permit);
            let Ok(tally) = tally else {
                let _ = reply.send(Err(()));
                return;
            };
            // On a cluster store other nodes hold stock too: the database counts it.
            let remaining = tally.unsold.unwrap_or(remaining_in_memory + in_flight);
            let quantity = sale.record.quantity;
            let consistent = quantity == remaining + tally.pending_payment + tally.paid
                && tally.users_over_limit == 0;
            if !consistent {
                tracing::error!(%sale_id, ?tally, remaining, quantity, "audit found the books inconsistent");
            }
            let _ = reply.send(Ok(Audit {
                quantity,
                remaining,
                in_flight,
                tally,
                consistent,
            }));
        });
    }
}
