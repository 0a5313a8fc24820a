//! The generator: one OS thread per core, each with its own single-threaded event loop,
//! its own connections and its own counters. Threads share nothing on the request path:
//! an open-model thread computes its own arrival times (every `threads`-th arrival),
//! requests are built from pre-rendered parts, and counters are plain fields. Once a
//! second each thread hands its interval to the reporter (one message per thread per
//! second, never one per request).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::{Request, Uri};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use crate::books::Receipt;
use crate::scenario::{Auth, BookKind, Plan, StepPlan};
use crate::schedule::{Model, Schedule};
use crate::stats::{Interval, StepStats, ThreadTotals, new_histogram, record};
use crate::template::{Values, extract};

/// Where requests go.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` for the Host header.
    pub authority: String,
    /// `http://host:port`, without a trailing slash.
    pub base: String,
}

impl Target {
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("bad target URL `{url}`"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => bail!("target scheme `{other}` is not supported (use http://)"),
            None => bail!("target `{url}` needs a scheme, e.g. http://127.0.0.1:8080"),
        }
        let authority = uri
            .authority()
            .with_context(|| format!("target `{url}` has no host"))?
            .to_string();
        let host = uri.host().unwrap_or("127.0.0.1");
        let port = uri.port_u16().unwrap_or(80);
        if !matches!(uri.path(), "" | "/") {
            bail!("target `{url}` must not have a path; scenario paths start at `/`");
        }
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
            .with_context(|| format!("resolve {host}"))?
            .next()
            .with_context(|| format!("{host} has no address"))?;
        Ok(Target {
            addr,
            base: format!("http://{authority}"),
            authority,
        })
    }
}

/// How to run one load.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub target: Target,
    pub model: Model,
    pub threads: usize,
    /// Connections across all threads.
    pub connections: usize,
    /// Open model: sessions in flight across all threads; arrivals beyond it wait (and
    /// their wait counts in their latency).
    pub max_sessions: usize,
    /// Per request.
    pub timeout: Duration,
    /// How long sessions may still run after the last arrival.
    pub drain: Duration,
    /// Bound on the receipts kept for the books check.
    pub max_receipts: usize,
    /// On 429/503 with `Retry-After`, end the session and (closed model) wait that long
    /// before the next, as a well-behaved client does.
    pub honor_retry_after: bool,
}

/// Read-only inputs shared by all threads.
pub struct Inputs {
    pub plan: Arc<Plan>,
    /// Values every session starts with (run id, sale id, constants, …).
    pub base_values: Values,
    pub users: Vec<Arc<str>>,
    /// Each user's JWT, for `{{token}}`.
    pub tokens: Vec<Arc<str>>,
    /// `Bearer <jwt>` per user, same order as `users`.
    pub shopper_auth: Vec<HeaderValue>,
    pub admin_auth: HeaderValue,
}

/// What the run produced.
pub struct RunOutput {
    pub totals: Vec<ThreadTotals>,
    pub started: std::time::Instant,
    pub elapsed: Duration,
    /// Generator CPU time (user + system) over the run, in seconds.
    pub cpu_seconds: f64,
}

/// Runs the load; `intervals` receives each thread's per-second figures.
pub fn run(
    spec: &RunSpec,
    inputs: Arc<Inputs>,
    intervals: mpsc::Sender<Interval>,
) -> anyhow::Result<RunOutput> {
    let threads = spec.threads.max(1);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let start_at: Arc<OnceLock<(Instant, std::time::Instant)>> = Arc::new(OnceLock::new());
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut handles = Vec::new();
    for index in 0..threads {
        let spec = spec.clone();
        let inputs = inputs.clone();
        let barrier = barrier.clone();
        let start_at = start_at.clone();
        let failed = failed.clone();
        let intervals = intervals.clone();
        let handle = std::thread::Builder::new()
            .name(format!("press-{index}"))
            .spawn(move || -> anyhow::Result<ThreadTotals> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let worker = Worker::new(index, threads, &spec, inputs, intervals);
                    let connected = worker.pool.fill().await;
                    // Everyone meets at the barrier even on failure, so nobody hangs.
                    // Blocking here is fine: this thread has nothing else to do yet.
                    if connected.is_err() {
                        failed.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    barrier.wait();
                    barrier.wait();
                    connected?;
                    if failed.load(std::sync::atomic::Ordering::SeqCst) {
                        return Ok(ThreadTotals::default());
                    }
                    let (start, _) = *start_at.get().expect("start set before release");
                    worker.drive(start).await;
                    Ok(worker.finish())
                })
            })?;
        handles.push(handle);
    }
    barrier.wait(); // all threads have connected (or failed)
    let cpu_before = crate::cpu_seconds();
    // A short lead time so every thread is parked on its first timer, not still waking.
    let start = Instant::now() + Duration::from_millis(20);
    let wall_start = std::time::Instant::now() + Duration::from_millis(20);
    let _ = start_at.set((start, wall_start));
    barrier.wait();
    let mut totals = Vec::new();
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(t)) => totals.push(t),
            Ok(Err(e)) => first_error = first_error.or(Some(e)),
            Err(_) => {
                first_error = first_error.or(Some(anyhow::anyhow!("a generator thread panicked")))
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let elapsed = wall_start.elapsed();
    Ok(RunOutput {
        totals,
        started: wall_start,
        elapsed,
        cpu_seconds: crate::cpu_seconds() - cpu_before,
    })
}

// ---- connections -----------------------------------------------------------------------

type Sender = SendRequest<Full<Bytes>>;

/// The thread's connections. In the closed model with at least one connection per
/// virtual user, each user keeps a connection of its own (`lanes`), as a browser does,
/// so what a server does to one client's connection (holding a refused client, say)
/// happens to that client alone. Otherwise the users share the pool, as the clients of
/// a gateway do.
struct Pool {
    target: Target,
    host: HeaderValue,
    size: usize,
    free: RefCell<Vec<Sender>>,
    permits: Semaphore,
    /// How long one connection may take to open (the run's per-request timeout): a server
    /// that stops accepting (its own connection bound reached) must fail the run's start,
    /// not hang it.
    connect_timeout: Duration,
    /// One slot per virtual user of this thread; empty until its connection is opened,
    /// and again after a failed exchange (the next send reconnects).
    lanes: Option<RefCell<Vec<Option<Sender>>>>,
}

impl Pool {
    async fn connect(&self) -> std::io::Result<Sender> {
        let opened = tokio::time::timeout(self.connect_timeout, async {
            let stream = tokio::net::TcpStream::connect(self.target.addr).await?;
            stream.set_nodelay(true)?;
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)
        })
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the connection did not open within {:?} (the server may accept no more connections)",
                    self.connect_timeout
                ),
            )
        })?;
        let (sender, conn) = opened?;
        tokio::task::spawn_local(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Opens every connection before the clock starts (one per lane when users keep
    /// their own).
    async fn fill(&self) -> anyhow::Result<()> {
        let count = match &self.lanes {
            Some(lanes) => lanes.borrow().len(),
            None => self.size,
        };
        for lane in 0..count {
            let sender = self
                .connect()
                .await
                .with_context(|| format!("cannot connect to {}", self.target.base))?;
            match &self.lanes {
                Some(lanes) => lanes.borrow_mut()[lane] = Some(sender),
                None => self.free.borrow_mut().push(sender),
            }
        }
        Ok(())
    }

    /// A connection for `lane`'s user (its own), or any free one of the shared pool.
    fn take(&self, lane: Option<usize>) -> Option<Sender> {
        if let (Some(lanes), Some(lane)) = (&self.lanes, lane) {
            return lanes.borrow_mut()[lane]
                .take()
                .filter(|sender| !sender.is_closed());
        }
        let mut free = self.free.borrow_mut();
        while let Some(sender) = free.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn give_back(&self, lane: Option<usize>, sender: Sender) {
        if let (Some(lanes), Some(lane)) = (&self.lanes, lane) {
            lanes.borrow_mut()[lane] = Some(sender);
        } else {
            self.free.borrow_mut().push(sender);
        }
    }
}

// ---- the per-thread worker -------------------------------------------------------------

/// A step's request parts that do not change between sessions.
struct Prebuilt {
    uri: Option<Uri>,
    body: Option<Bytes>,
    headers: Vec<(HeaderName, Option<HeaderValue>)>,
}

struct Worker {
    index: usize,
    threads: usize,
    model: Model,
    timeout: Duration,
    drain: Duration,
    max_sessions: usize,
    max_receipts: usize,
    honor_retry_after: bool,
    inputs: Arc<Inputs>,
    pool: Pool,
    prebuilt: Vec<Prebuilt>,
    steps: RefCell<Vec<StepStats>>,
    interval: RefCell<Interval>,
    intervals: mpsc::Sender<Interval>,
    receipts: RefCell<Vec<Receipt>>,
    receipts_dropped: Cell<u64>,
    dispatch_lag: RefCell<hdrhistogram::Histogram<u64>>,
    started: Cell<u64>,
    started_in_time: Cell<u64>,
    finished: Cell<u64>,
    abandoned: Cell<u64>,
    /// Requests sent and not yet answered, so those still out at the drain deadline are
    /// counted (as failed, and as unanswered purchases for the books) instead of
    /// vanishing with their tasks: they are the slowest of the run.
    /// Slots reused through `free_slots`: no hashing, and no allocation once the run
    /// has as many slots as it ever has requests out at once.
    in_flight: RefCell<Vec<Option<InFlight>>>,
    free_slots: RefCell<Vec<usize>>,
}

/// A request on its way, as the drain deadline would have to account it.
struct InFlight {
    step: usize,
    due: Instant,
    /// The idempotency key of a step kept for the books.
    idempotency_key: Option<String>,
    /// For a purchase kept for the books: who sent it, and its body.
    purchase: Option<(usize, Bytes)>,
}

fn split(total: usize, parts: usize, index: usize) -> usize {
    total / parts + usize::from(index < total % parts)
}

impl Worker {
    fn new(
        index: usize,
        threads: usize,
        spec: &RunSpec,
        inputs: Arc<Inputs>,
        intervals: mpsc::Sender<Interval>,
    ) -> Rc<Worker> {
        let prebuilt = inputs
            .plan
            .flows
            .iter()
            .flat_map(|f| &f.steps)
            .map(|step| Prebuilt {
                uri: step.path.as_static().and_then(|p| p.parse().ok()),
                body: step
                    .body
                    .as_ref()
                    .and_then(|b| b.as_static())
                    .map(|b| Bytes::copy_from_slice(b.as_bytes())),
                headers: step
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        (
                            name.clone(),
                            value
                                .as_static()
                                .and_then(|v| HeaderValue::from_str(v).ok()),
                        )
                    })
                    .collect(),
            })
            .collect();
        let connections = split(spec.connections.max(threads), threads, index).max(1);
        let lanes = match &spec.model {
            Model::Closed { vus, .. } if split(*vus, threads, index) <= connections => Some(
                RefCell::new((0..split(*vus, threads, index)).map(|_| None).collect()),
            ),
            _ => None,
        };
        Rc::new(Worker {
            index,
            threads,
            model: spec.model.clone(),
            timeout: spec.timeout,
            drain: spec.drain,
            max_sessions: split(spec.max_sessions.max(threads), threads, index).max(1),
            max_receipts: split(spec.max_receipts, threads, index),
            honor_retry_after: spec.honor_retry_after,
            pool: Pool {
                host: HeaderValue::from_str(&spec.target.authority)
                    .unwrap_or(HeaderValue::from_static("localhost")),
                target: spec.target.clone(),
                size: connections,
                free: RefCell::new(Vec::with_capacity(connections)),
                permits: Semaphore::new(connections),
                connect_timeout: spec.timeout,
                lanes,
            },
            prebuilt,
            steps: RefCell::new(vec![StepStats::default(); inputs.plan.step_names.len()]),
            interval: RefCell::new(Interval::new(1)),
            intervals,
            receipts: RefCell::new(Vec::new()),
            receipts_dropped: Cell::new(0),
            dispatch_lag: RefCell::new(new_histogram()),
            started: Cell::new(0),
            started_in_time: Cell::new(0),
            finished: Cell::new(0),
            abandoned: Cell::new(0),
            in_flight: RefCell::new(Vec::new()),
            free_slots: RefCell::new(Vec::new()),
            inputs,
        })
    }

    async fn drive(self: &Rc<Self>, start: Instant) {
        let ticker = tokio::task::spawn_local(self.clone().tick(start));
        let sessions = Arc::new(Semaphore::new(self.max_sessions));
        let end = match &self.model {
            Model::Open { stages } => {
                let schedule = Schedule::new(stages);
                let end = start + schedule_end(stages);
                let mut n = self.index as u64;
                // A generator that falls behind starts its late arrivals until the drain
                // deadline, never after: the run lasts at most its duration and the drain,
                // whatever the rate asked. Arrivals never started count as not started.
                let last_start = end + self.drain;
                while let Some(offset) = schedule.time_of(n) {
                    let at = start + offset;
                    if at > Instant::now() {
                        tokio::time::sleep_until(at).await;
                    }
                    let Ok(permit) =
                        tokio::time::timeout_at(last_start, sessions.clone().acquire_owned()).await
                    else {
                        break;
                    };
                    let permit = permit.expect("never closed");
                    if Instant::now() >= last_start {
                        break;
                    }
                    let now = Instant::now();
                    let lag = now.saturating_duration_since(at);
                    record(&mut self.dispatch_lag.borrow_mut(), lag.as_micros() as u64);
                    let me = self.clone();
                    self.started.set(self.started.get() + 1);
                    if now <= end {
                        self.started_in_time.set(self.started_in_time.get() + 1);
                    }
                    tokio::task::spawn_local(async move {
                        let _ = me.session(n, at, None).await;
                        me.finished.set(me.finished.get() + 1);
                        drop(permit);
                    });
                    n += self.threads as u64;
                }
                end
            }
            Model::Closed {
                vus,
                ramp,
                duration,
            } => {
                let (vus, ramp) = (*vus, *ramp);
                let mine = split(vus, self.threads, self.index);
                let end = start + ramp + *duration;
                for v in 0..mine {
                    let global = (v * self.threads + self.index) as u64;
                    let delay = ramp.mul_f64(global as f64 / vus.max(1) as f64);
                    // Its own connection when there is one per user; else the pool.
                    let lane = self.pool.lanes.is_some().then_some(v);
                    let me = self.clone();
                    let permit = sessions
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("never closed");
                    tokio::task::spawn_local(async move {
                        tokio::time::sleep_until(start + delay).await;
                        let mut n = global;
                        while Instant::now() < end {
                            me.started.set(me.started.get() + 1);
                            me.started_in_time.set(me.started_in_time.get() + 1);
                            let back_off = me.session(n, Instant::now(), lane).await;
                            me.finished.set(me.finished.get() + 1);
                            n += vus as u64;
                            if let Some(pause) = back_off {
                                // As a well-behaved client: wait at least what the
                                // server asked, up to half as long again, so refused
                                // users do not return in step.
                                let pause = pause.mul_f64(1.0 + 0.5 * rand::random::<f64>());
                                tokio::time::sleep(
                                    pause.min(end.saturating_duration_since(Instant::now())),
                                )
                                .await;
                            }
                        }
                        drop(permit);
                    });
                }
                end
            }
        };
        // Let sessions in flight finish, up to the drain deadline.
        let all = self.max_sessions as u32;
        // The same deadline the open model's last start keeps: the run lasts at most its
        // duration and the drain.
        let deadline = end + self.drain;
        if tokio::time::timeout_at(deadline, sessions.acquire_many(all))
            .await
            .is_err()
        {
            self.abandoned
                .set(self.started.get().saturating_sub(self.finished.get()));
            self.account_abandoned();
        }
        ticker.abort();
        // The last partial second.
        let last = self.interval.replace(Interval::new(0));
        if last.requests > 0 {
            let _ = self.intervals.try_send(last);
        }
    }

    async fn tick(self: Rc<Self>, start: Instant) {
        let mut second = 0u64;
        loop {
            second += 1;
            tokio::time::sleep_until(start + Duration::from_secs(second)).await;
            // The interval tagged `second` covers (second - 1, second].
            let done = self.interval.replace(Interval::new(second + 1));
            // A full channel means the reporter is behind; losing a timeline point is
            // better than stalling the generator.
            let _ = self.intervals.try_send(done);
        }
    }

    fn hold(&self, request: InFlight) -> usize {
        let mut in_flight = self.in_flight.borrow_mut();
        match self.free_slots.borrow_mut().pop() {
            Some(slot) => {
                in_flight[slot] = Some(request);
                slot
            }
            None => {
                in_flight.push(Some(request));
                in_flight.len() - 1
            }
        }
    }

    fn release(&self, slot: usize) -> InFlight {
        let request = self.in_flight.borrow_mut()[slot]
            .take()
            .expect("a slot held by this request");
        self.free_slots.borrow_mut().push(slot);
        request
    }

    /// At the drain deadline: every request still out failed ("abandoned"), its latency
    /// what it had waited so far; a purchase kept for the books is unanswered.
    fn account_abandoned(&self) {
        let now = Instant::now();
        let plan = &*self.inputs.plan;
        self.free_slots.take();
        for request in self.in_flight.take().into_iter().flatten() {
            let Some(step) = plan
                .flows
                .iter()
                .flat_map(|f| &f.steps)
                .find(|s| s.id == request.step)
            else {
                continue;
            };
            let micros = now.saturating_duration_since(request.due).as_micros() as u64;
            self.account(step, &Outcome::Failed("abandoned"), micros);
            if let Some((user_index, body)) = request.purchase {
                self.keep_receipt(Receipt::unanswered(
                    &self.inputs.users[user_index],
                    request.idempotency_key,
                    requested_quantity(&body),
                ));
            }
        }
    }

    fn finish(&self) -> ThreadTotals {
        ThreadTotals {
            steps: self.steps.take(),
            sessions_started: self.started.get(),
            sessions_started_in_time: self.started_in_time.get(),
            sessions_finished: self.finished.get(),
            sessions_abandoned: self.abandoned.get(),
            dispatch_lag: Some(self.dispatch_lag.borrow().clone()),
            books: self.receipts.take(),
            receipts_dropped: self.receipts_dropped.get(),
        }
    }

    /// One pass through a flow; `due` is when its first request should go out. Returns
    /// the pause the server asked for when it refused with `Retry-After` and the run
    /// honours it (the session then ends there).
    async fn session(&self, n: u64, mut due: Instant, lane: Option<usize>) -> Option<Duration> {
        let inputs = &*self.inputs;
        let plan = &*inputs.plan;
        let flow = plan.flow_for(splitmix64(n));
        let mut values = inputs.base_values.clone();
        let user_index = (n % inputs.users.len() as u64) as usize;
        values[slot::USER] = Some(inputs.users[user_index].clone());
        values[slot::TOKEN] = Some(inputs.tokens[user_index].clone());
        values[slot::ITERATION] = Some(Arc::from(n.to_string()));
        if let Some(csv) = &plan.csv {
            let row = &csv.rows[(n % csv.rows.len() as u64) as usize];
            for (slot, value) in csv.columns.iter().zip(row) {
                values[*slot] = Some(value.clone());
            }
        }
        let mut path = String::new();
        let mut scratch = String::new();
        for (i, step) in flow.steps.iter().enumerate() {
            if let Some(think) = &step.think {
                let pause = think.sample(rand::random::<f64>());
                if i == 0 {
                    due += pause;
                } else {
                    due = Instant::now() + pause;
                }
                tokio::time::sleep_until(due).await;
            }
            let (request, body) =
                match self.build(step, &values, user_index, &mut path, &mut scratch) {
                    Ok(built) => built,
                    Err(_missing) => {
                        self.steps.borrow_mut()[step.id].skipped += 1;
                        continue;
                    }
                };
            // Only steps kept for the books need the key afterwards: no copy otherwise.
            let idempotency_key = step.book.and_then(|_| {
                request
                    .headers()
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            });
            // What the books need if no answer comes: the units the purchase asked for.
            let asked = (step.book == Some(BookKind::Purchase)).then_some(body);
            // Registered while it is out (with the key and body moved in, taken back
            // after), so the drain deadline can account it.
            let slot = self.hold(InFlight {
                step: step.id,
                due,
                idempotency_key,
                purchase: asked.map(|body| (user_index, body)),
            });
            let outcome = self.send(request, lane).await;
            let held = self.release(slot);
            let (idempotency_key, asked) =
                (held.idempotency_key, held.purchase.map(|(_, body)| body));
            let now = Instant::now();
            let micros = now.saturating_duration_since(due).as_micros() as u64;
            self.account(step, &outcome, micros);
            if let Outcome::Answer {
                status,
                body,
                retry_after,
            } = &outcome
            {
                let _ = retry_after;
                let json = if !step.extract.is_empty() || step.book.is_some() || *status >= 400 {
                    serde_json::from_slice::<serde_json::Value>(body).ok()
                } else {
                    None
                };
                if let Some(json) = &json {
                    if *status >= 400
                        && let Some(code) = json.pointer("/error/code").and_then(|c| c.as_str())
                    {
                        *self.steps.borrow_mut()[step.id]
                            .codes
                            .entry(code.to_owned())
                            .or_default() += 1;
                    }
                    if (200..300).contains(status) {
                        for (slot, pointer) in &step.extract {
                            values[*slot] = extract(json, pointer);
                        }
                    }
                }
                if let Some(kind) = step.book {
                    self.keep_receipt(Receipt::from_answer(
                        kind,
                        *status,
                        &inputs.users[user_index],
                        idempotency_key,
                        json.as_ref(),
                        match kind {
                            BookKind::Pay => path.rsplit('/').nth(1).map(str::to_owned),
                            BookKind::Purchase => None,
                        },
                    ));
                }
            } else if step.book == Some(BookKind::Purchase) {
                // No answer: the order may or may not exist. The books check must know.
                self.keep_receipt(Receipt::unanswered(
                    &inputs.users[user_index],
                    idempotency_key,
                    asked.as_deref().map_or(0, requested_quantity),
                ));
            }
            if self.honor_retry_after
                && let Outcome::Answer {
                    status: 429 | 503,
                    retry_after: Some(pause),
                    ..
                } = &outcome
            {
                return Some(*pause);
            }
            due = now;
        }
        None
    }

    fn keep_receipt(&self, receipt: Receipt) {
        let mut receipts = self.receipts.borrow_mut();
        if receipts.len() < self.max_receipts {
            receipts.push(receipt);
        } else {
            self.receipts_dropped.set(self.receipts_dropped.get() + 1);
        }
    }

    fn build(
        &self,
        step: &StepPlan,
        values: &Values,
        user_index: usize,
        path: &mut String,
        scratch: &mut String,
    ) -> Result<(Request<Full<Bytes>>, Bytes), usize> {
        let pre = &self.prebuilt[step.id];
        path.clear();
        let uri = match &pre.uri {
            Some(uri) => {
                path.push_str(uri.path());
                uri.clone()
            }
            None => {
                step.path.render(values, path)?;
                Uri::try_from(path.as_str()).map_err(|_| usize::MAX)?
            }
        };
        let mut builder = Request::builder()
            .method(step.method.clone())
            .uri(uri)
            .header(HOST, self.pool.host.clone());
        match step.auth {
            Auth::None => {}
            Auth::Shopper => {
                builder =
                    builder.header(AUTHORIZATION, self.inputs.shopper_auth[user_index].clone())
            }
            Auth::Admin => builder = builder.header(AUTHORIZATION, self.inputs.admin_auth.clone()),
        }
        for ((name, template), (_, value)) in step.headers.iter().zip(&pre.headers) {
            let value = match value {
                Some(value) => value.clone(),
                None => {
                    scratch.clear();
                    template.render(values, scratch)?;
                    HeaderValue::from_str(scratch).map_err(|_| usize::MAX)?
                }
            };
            builder = builder.header(name, value);
        }
        let body = match (&pre.body, &step.body) {
            (Some(body), _) => body.clone(),
            (None, Some(template)) => {
                scratch.clear();
                template.render(values, scratch)?;
                Bytes::copy_from_slice(scratch.as_bytes())
            }
            (None, None) => Bytes::new(),
        };
        if step.body.is_some() {
            builder = builder.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let request = builder
            .body(Full::new(body.clone()))
            .map_err(|_| usize::MAX)?;
        Ok((request, body))
    }

    /// One request within `--timeout`, the wait for a connection included: a request
    /// queued behind a full pool, or reconnecting to a server that does not accept, has
    /// been waiting as long for its answer as one on the wire.
    async fn send(&self, request: Request<Full<Bytes>>, lane: Option<usize>) -> Outcome {
        let exchange = async {
            // A user with a lane of its own has one request at a time on it: no permit.
            let _permit = match lane {
                Some(_) => None,
                None => Some(self.pool.permits.acquire().await.expect("never closed")),
            };
            let mut sender = match self.pool.take(lane) {
                Some(sender) => sender,
                None => self.pool.connect().await.map_err(|_| "connect")?,
            };
            sender.ready().await.map_err(|_| "io")?;
            let response = sender.send_request(request).await.map_err(|_| "io")?;
            let status = response.status().as_u16();
            let retry_after = retry_after(response.headers());
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|_| "io")?
                .to_bytes();
            Ok::<_, &'static str>((sender, status, body, retry_after))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok((sender, status, body, retry_after))) => {
                self.pool.give_back(lane, sender);
                Outcome::Answer {
                    status,
                    body,
                    retry_after,
                }
            }
            // The connection is in an unknown state: drop it, the next send reconnects.
            Ok(Err(kind)) => Outcome::Failed(kind),
            Err(_) => Outcome::Failed("timeout"),
        }
    }

    fn account(&self, step: &StepPlan, outcome: &Outcome, micros: u64) {
        let mut steps = self.steps.borrow_mut();
        let stats = &mut steps[step.id];
        stats.requests += 1;
        record(&mut stats.hist, micros);
        let error = match outcome {
            Outcome::Answer { status, .. } => {
                *stats.statuses.entry(*status).or_default() += 1;
                record(
                    stats.by_status.entry(*status).or_insert_with(new_histogram),
                    micros,
                );
                !step.expected(*status)
            }
            Outcome::Failed(kind) => {
                *stats.transport.entry(kind).or_default() += 1;
                true
            }
        };
        if error {
            stats.errors += 1;
        }
        drop(steps);
        let mut interval = self.interval.borrow_mut();
        interval.requests += 1;
        interval.errors += u64::from(error);
        record(&mut interval.hist, micros);
        if let Outcome::Answer {
            status: 429 | 503, ..
        } = outcome
        {
            interval.refusal(micros);
        }
    }
}

/// The units a purchase's JSON body asks for; 0 when it cannot be read (the books then
/// assume the most a shopper may hold).
fn requested_quantity(body: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|json| json.get("quantity")?.as_u64())
        .unwrap_or(0)
}

fn schedule_end(stages: &[crate::schedule::Stage]) -> Duration {
    stages.iter().map(|s| s.duration).sum()
}

enum Outcome {
    Answer {
        status: u16,
        body: Bytes,
        retry_after: Option<Duration>,
    },
    Failed(&'static str),
}

/// Slots of the built-in variables (their order in `scenario::BUILT_IN_VARS`).
pub mod slot {
    pub const RUN: usize = 0;
    pub const USER: usize = 1;
    pub const TOKEN: usize = 2;
    pub const ITERATION: usize = 3;
    pub const ADMIN_TOKEN: usize = 4;
    pub const SALE_ID: usize = 5;
    pub const SKU: usize = 6;
}

/// Spreads consecutive session numbers over the flow weights.
fn splitmix64(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The wait a refusal's `Retry-After` asks for (delay-seconds), at most a minute: the
/// most a Stampede server asks (`guard.system.overload_retry_after_max` and
/// `hold_refused` are at most 1m). Read the same way by the run's clients and the books
/// check.
pub(crate) fn retry_after(headers: &hyper::HeaderMap) -> Option<Duration> {
    headers
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(60)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_must_be_plain_http_urls() {
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.base, "http://127.0.0.1:8080");
        assert!(Target::parse("https://example.com").is_err());
        assert!(Target::parse("127.0.0.1:8080").is_err());
        assert!(Target::parse("http://127.0.0.1:8080/v1").is_err());
    }

    #[test]
    fn work_is_split_evenly() {
        let parts: Vec<_> = (0..3).map(|i| split(64, 3, i)).collect();
        assert_eq!(parts, [22, 21, 21]);
        assert_eq!(parts.iter().sum::<usize>(), 64);
    }

    #[test]
    fn built_in_slots_match_the_scenario_table() {
        use crate::scenario::BUILT_IN_VARS as V;
        assert_eq!(V[slot::RUN], "run");
        assert_eq!(V[slot::USER], "user");
        assert_eq!(V[slot::TOKEN], "token");
        assert_eq!(V[slot::ITERATION], "iteration");
        assert_eq!(V[slot::ADMIN_TOKEN], "admin_token");
        assert_eq!(V[slot::SALE_ID], "sale_id");
        assert_eq!(V[slot::SKU], "sku");
    }
}
