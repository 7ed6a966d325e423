//! The Tollgate gateway: an OpenAI-compatible HTTP server that authenticates
//! virtual keys, routes each model to its deployment and relays the answer,
//! turning every unhappy path into an exact, OpenAI-shaped decision.
//!
//! [`pipeline`] holds a request's life from top to bottom; [`error`] is the
//! one place where a failure becomes a status, type and code.

pub mod admin;
pub mod auth;
pub mod config;
pub mod connection_pool;
pub mod dashboard;
pub mod error;
pub mod header_names;
pub mod headroom;
pub mod idempotency;
pub mod limits;
pub mod metrics;
pub mod money;
pub mod pipeline;
pub mod routing;
pub mod server;
mod stream;
pub mod transport;
pub mod upstream;

pub use config::Config;
pub use error::Error;

use auth::KeyCache;
use idempotency::IdempotencyStore;
use limits::Limits;
use money::Money;
use routing::Pool;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate_core::clock::{Clock, SystemClock};
use tollgate_core::tokens::Estimator;
use tollgate_store::redis::RedisLimiter;
use tollgate_store::shared::SharedLimiter;
use tollgate_store::{Database, LimitStore, MemoryLimiter, MoneyBook, MoneyStore, SecretHash};
use upstream::Deployment;

/// A gateway ready to serve: configuration, key table, deployments.
#[derive(Debug)]
pub struct Gateway {
    /// The configuration it was built from.
    pub config: Config,
    /// Keys, budgets, ledger.
    pub db: Database,
    /// The key table in memory.
    pub keys: KeyCache,
    /// Model name → the pool of deployments that serve it (looked up a few
    /// times a request: foldhash, seeded per process, hashes a name for a
    /// fraction of SipHash's cost).
    pub routes: HashMap<String, Arc<Pool>, foldhash::fast::RandomState>,
    /// Every model name served, in configuration order.
    pub model_names: Vec<String>,
    /// Every deployment, in configuration order.
    pub deployments: Vec<Arc<Deployment>>,
    /// Rate limits and daily caps.
    pub limits: Arc<Limits>,
    /// Budgets, credits and the usage ledger.
    pub money: Arc<Money>,
    /// Answers kept for `Idempotency-Key` repeats.
    pub idempotency: Arc<IdempotencyStore>,
    /// How requests' tokens are estimated before the call.
    pub estimator: Estimator,
    /// The `/ui` dashboard's sessions and refusal counts.
    pub dashboard: dashboard::Dashboard,
    admin_key: Option<SecretHash>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Gateway {
    /// Whether a deployment paces tokens under a provider limit, so that
    /// every request needs its token estimate.
    pub fn paces_tokens(&self) -> bool {
        self.deployments.iter().any(|d| d.headroom.counts_tokens())
    }

    /// Builds a gateway. `secret` reads a secret by environment-variable
    /// name (the process environment in production, a map in tests); every
    /// deployment must have a base URL by now (mock deployments are started
    /// by the caller and given theirs).
    pub async fn build(
        config: Config,
        secret: impl Fn(&str) -> Option<String>,
    ) -> Result<Arc<Self>, Error> {
        Self::build_with_clock(config, secret, Arc::new(SystemClock::new())).await
    }

    /// [`Gateway::build`] with limits decided on `clock` (tests drive a
    /// fake one).
    pub async fn build_with_clock(
        mut config: Config,
        secret: impl Fn(&str) -> Option<String>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, Error> {
        // Resolved once: the serving threads and each deployment's pools
        // per thread must agree on it.
        if config.server.threads == 0 {
            config.server.threads = std::thread::available_parallelism().map_or(1, usize::from);
        }
        // rustls is built without a default crypto provider; ring is ours.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let db = Database::open(config.database_url()).await?;
        let keys = KeyCache::load(db.clone(), config.clone()).await?;
        let (store, book, redis_records) = match &config.state.redis_url {
            Some(url) => {
                let state = &config.state;
                let redis =
                    RedisLimiter::connect_to(url, state.redis_cluster, &state.redis_prefix).await?;
                let money = redis.money();
                let records = redis.idempotency();
                let policy = config.state.on_redis_outage;
                let shared = Arc::new(SharedLimiter::new(redis, policy, clock.clone()).await?);
                tracing::info!(
                    prefix = %config.state.redis_prefix,
                    on_redis_outage = policy.as_str(),
                    live_replicas = shared.health().live_replicas(),
                    "limit, budget and credit state in Redis, shared by every replica"
                );
                let money = money.with_health(shared.health().clone());
                (
                    LimitStore::Redis(shared),
                    MoneyStore::Redis(money),
                    Some(records),
                )
            }
            None => (
                LimitStore::Memory(MemoryLimiter::new(), clock.clone()),
                MoneyStore::Memory(MoneyBook::new()),
                None,
            ),
        };
        let with_limits = store.decides_money();
        let money =
            Arc::new(Money::load(db.clone(), &config, clock.clone(), book, with_limits).await?);
        let limits = Arc::new(Limits::new(store, clock, &config));
        let estimator = Estimator {
            fallback: config.limits.fallback_encoding.into(),
            default_output: config.limits.default_output_tokens,
        };
        let mut pools: HashMap<String, Vec<Arc<Deployment>>> = HashMap::new();
        let mut deployments = Vec::new();
        let mut model_names = Vec::new();
        for d in &config.deployments {
            let base_url = d
                .base_url
                .as_deref()
                .or_else(|| Deployment::default_base_url(d.provider))
                .ok_or_else(|| Error::UpstreamClient {
                    deployment: d.name.clone(),
                    detail: "no base_url".into(),
                })?;
            let key = match (d.api_key_env.as_deref(), d.provider) {
                (Some(env), _) => secret(env),
                // The simulated provider wants some bearer key, like the real one.
                (None, config::Provider::Mock) => Some("tollgate-mock".to_owned()),
                (None, _) => None,
            };
            if d.api_key_env.is_some() && key.is_none() {
                tracing::warn!(deployment = %d.name, env = d.api_key_env.as_deref(), "the deployment's key variable is not set; calling it without a key");
            }
            let deployment = Arc::new(Deployment::new(d, base_url, key, config.server.threads)?);
            deployments.push(deployment.clone());
            for m in &d.models {
                // Every deployment that lists a model joins its pool.
                let pool = pools.entry(m.clone()).or_default();
                if pool.is_empty() {
                    model_names.push(m.clone());
                }
                pool.push(deployment.clone());
            }
        }
        let routes: HashMap<_, _, foldhash::fast::RandomState> = pools
            .into_iter()
            .map(|(m, ds)| (m, Arc::new(Pool::new(ds))))
            .collect();
        money.warn_unpriced(&model_names);
        for (model, chain) in &config.routing.fallbacks {
            for f in chain.iter().filter(|f| !routes.contains_key(*f)) {
                tracing::warn!(model, fallback = %f, "a fallback model no deployment serves is skipped");
            }
        }
        let ttl = config.server.idempotency_ttl;
        let idempotency = Arc::new(match &redis_records {
            Some(redis) => IdempotencyStore::in_redis(
                redis.clone(),
                ttl,
                config.routing.max_request_timeout + std::time::Duration::from_secs(30),
            ),
            None => IdempotencyStore::new(ttl),
        });
        let admin_key = secret(&config.server.admin_key_env)
            .filter(|k| !k.is_empty())
            .map(|k| SecretHash::of(&k));
        let gw = Arc::new(Self {
            config,
            db,
            keys,
            routes,
            model_names,
            deployments,
            limits,
            money,
            idempotency,
            estimator,
            dashboard: Default::default(),
            admin_key,
            tasks: Default::default(),
        });
        gw.start_key_refresh();
        gw.start_limit_eviction();
        metrics::limit_store_available(true);
        if let Some(shared) = gw.limits.shared() {
            gw.keep_task(tokio::spawn(shared.clone().run_heartbeat()));
        }
        gw.keep_task(tokio::spawn(metrics::upkeep(metrics::handle())));
        Ok(gw)
    }

    /// Checks `presented` against the admin key, in constant time.
    pub fn check_admin_key(&self, presented: &str) -> Result<(), Error> {
        let expected = self.admin_key.as_ref().ok_or(Error::AdminDisabled)?;
        if SecretHash::of(presented).ct_eq(expected) {
            Ok(())
        } else {
            Err(Error::AdminUnauthorized)
        }
    }

    /// Each deployment's models, health and provider limits, as
    /// `/admin/deployments` and the dashboard show them.
    pub fn deployments_view(&self) -> Vec<serde_json::Value> {
        let now = self.limits.clock().now_ns();
        self.deployments
            .iter()
            .map(|d| {
                let mut v = d.health.view(now);
                v["provider_limits"] = d.headroom.view(now);
                v["name"] = serde_json::json!(&*d.name);
                v["models"] = serde_json::json!(d.models);
                v
            })
            .collect()
    }

    /// How many threads serve connections (`server.threads`, resolved to
    /// one per CPU when it was 0).
    pub fn serving_threads(&self) -> usize {
        self.config.server.threads
    }

    /// Whether `/admin` is enabled.
    pub fn admin_enabled(&self) -> bool {
        self.admin_key.is_some()
    }

    fn start_key_refresh(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = self.config.server.key_refresh;
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(gw) = weak.upgrade() else { return };
                if let Err(e) = gw.keys.refresh_if_changed().await {
                    tracing::warn!(error = %e, "could not refresh the key table");
                }
                if let Err(e) = gw.money.sync().await {
                    tracing::warn!(error = %e, "could not refresh budgets and credits");
                }
            }
        });
        self.keep_task(task);
    }

    /// Drops idle limiter state and ended budget counts now and then, so
    /// that millions of distinct end users do not grow memory without bound.
    fn start_limit_eviction(self: &Arc<Self>) {
        let limits = Arc::downgrade(&self.limits);
        let idempotency = Arc::downgrade(&self.idempotency);
        let money = Arc::downgrade(&self.money);
        let every = self.config.limits.evict_every;
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(limits) = limits.upgrade() else {
                    return;
                };
                if let Some(store) = idempotency.upgrade() {
                    store.purge();
                }
                if let Some(money) = money.upgrade() {
                    let forgotten = money.forget_ended();
                    if forgotten > 0 {
                        tracing::debug!(forgotten, "forgot budget counts of ended windows");
                    }
                }
                let dropped = limits.evict_idle();
                if dropped > 0 {
                    tracing::debug!(
                        dropped,
                        tracked = limits.tracked(),
                        "evicted idle limiter state"
                    );
                }
            }
        });
        self.keep_task(task);
    }

    fn keep_task(&self, task: JoinHandle<()>) {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(|e| e.into_inner());
        for task in tasks.drain(..) {
            task.abort();
        }
    }
}

/// A gateway serving on a socket, for tests and embedding.
#[derive(Debug)]
pub struct RunningGateway {
    addr: SocketAddr,
    gateway: Arc<Gateway>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), Error>>,
}

impl RunningGateway {
    /// Binds `addr` (port 0 for an ephemeral port) and serves `gateway` on it.
    pub async fn start(gateway: Arc<Gateway>, addr: SocketAddr) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server::serve(gateway.clone(), listener, async {
            let _ = rx.await;
        }));
        Ok(Self {
            addr,
            gateway,
            shutdown: Some(tx),
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The gateway it serves.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Stops accepting, waits for in-flight requests within the grace
    /// period, and makes the ledger durable.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let served = (&mut self.task).await.unwrap_or(Ok(()));
        self.gateway.money.close().await;
        served
    }
}
