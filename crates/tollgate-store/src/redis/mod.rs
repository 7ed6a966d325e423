//! Limit state in Redis, shared by every replica: one script call per
//! admission decision covering every limit of every subject of the request
//! (GCRA buckets and daily counters), one per reconciliation, both on
//! Redis's own clock so replicas with skewed clocks still agree.
//!
//! The scripts are loaded once and called by SHA (`EVALSHA`, falling back to
//! `EVAL` after a Redis restart forgot them). State keys expire as soon as
//! forgetting them changes no decision.
//!
//! **Placement for Redis Cluster**: every key of one decision carries the
//! same hash tag, so a script touches one slot. The caller names it: the
//! key's team when it has one (whether or not the team has limits of its
//! own), else the key. A team's keys therefore live together in the team's
//! slot, and a subject's state stays under one tag for as long as the key
//! stays in its team.

mod conn;
mod idempotency;
mod money;

pub use conn::RedisConn;
pub use idempotency::{IdempotencyClaim, RedisIdempotency};
pub use money::{MoneyCharge, RedisMoney, Reserve, Unknown};

use crate::Error;
use crate::book::Remaining;
use std::time::Duration;
use tollgate_core::limits::{
    Cost, Grant, LimitKind, LimitSet, Reading, Refusal, RefusalKind, Subject,
};

const ADMIT: &str = concat!(include_str!("reserve.lua"), include_str!("admit.lua"));
const RECONCILE: &str = include_str!("reconcile.lua");
const HEARTBEAT: &str = include_str!("heartbeat.lua");

/// A decision and the moment (ns, on the deciding clock) it was made at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The grant, or why not; a refusal changed nothing.
    pub result: Result<Grant, Refusal>,
    /// When it was decided, for the reconciliation.
    pub at: u64,
    /// Whether this process decided it alone (Redis was down and the
    /// replica fell back to its share): its reconciliation stays local too.
    pub local: bool,
    /// With a money charge decided in the same call and admitted: what its
    /// budgets and account have left after the reservation.
    pub money: Option<Remaining>,
}

/// What one admission call decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// The limits decided; a money charge that came along was reserved
    /// exactly when the limits admitted.
    Decided(Decision),
    /// The money charge was refused, or Redis lacks its counts: nothing
    /// was charged anywhere.
    Money(Reserve),
}

impl Decision {
    /// Where and when it was made, for the reconciliation.
    pub fn stamp(&self) -> Stamp {
        Stamp {
            at: self.at,
            local: self.local,
        }
    }
}

/// Where and when a charge was made: a reconciliation corrects it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stamp {
    /// When (ns, on the deciding clock).
    pub at: u64,
    /// Whether this process decided alone.
    pub local: bool,
}

/// What a replica learns from one heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// Replicas that announced themselves lately, this one included.
    pub live: u64,
    /// Redis's clock, µs since the epoch.
    pub now_us: u64,
    /// The token of the state Redis holds; another token means it lost it.
    pub epoch: String,
    /// Whether this heartbeat set the token (Redis had none).
    pub set_epoch: bool,
}

/// Limit state in one Redis (or one Redis Cluster slot per decision).
#[derive(Clone)]
pub struct RedisLimiter {
    conn: RedisConn,
    admit: redis::Script,
    reconcile: redis::Script,
    heartbeat: redis::Script,
    prefix: String,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// Connects to `url` (`redis://127.0.0.1:6379`); state keys start with
    /// `prefix` so that several gateways (or test runs) can share a Redis.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, Error> {
        Self::connect_to(url, false, prefix).await
    }

    /// [`RedisLimiter::connect`], to a Redis Cluster when `cluster` (then
    /// `url` lists seed nodes separated by commas).
    pub async fn connect_to(url: &str, cluster: bool, prefix: &str) -> Result<Self, Error> {
        let conn = RedisConn::connect(url, cluster)
            .await
            .map_err(Error::Redis)?;
        Ok(Self {
            conn,
            admit: redis::Script::new(ADMIT),
            reconcile: redis::Script::new(RECONCILE),
            heartbeat: redis::Script::new(HEARTBEAT),
            prefix: prefix.to_owned(),
        })
    }

    /// Idempotency records on the same connection.
    pub fn idempotency(&self) -> RedisIdempotency {
        RedisIdempotency::new(self.conn.clone(), &self.prefix)
    }

    /// Budgets and credits on the same connection.
    pub fn money(&self) -> RedisMoney {
        RedisMoney::new(self.conn.clone(), &self.prefix)
    }

    /// The state keys of `subjects`, all under the hash tag `placement`.
    fn keys(&self, placement: &str, subjects: &[(Subject, LimitSet)]) -> Vec<String> {
        let tag = placement.replace(['{', '}'], "_");
        subjects
            .iter()
            .map(|(s, _)| {
                let p = &self.prefix;
                match s {
                    Subject::Key(k) => format!("{p}:{{{tag}}}:k:{k}"),
                    Subject::KeyModel(k, m) => format!("{p}:{{{tag}}}:m:{k}:{m}"),
                    Subject::KeyUser(k, u) => format!("{p}:{{{tag}}}:u:{k}:{u}"),
                    Subject::Team(t) => format!("{p}:{{{tag}}}:t:{t}"),
                }
            })
            .collect()
    }

    /// Whether a money charge can ride along in [`RedisLimiter::admit`]:
    /// on one Redis, yes; on a Cluster the money keys (one hash tag for all
    /// money) and a request's limit keys sit in different slots.
    pub fn decides_money(&self) -> bool {
        matches!(self.conn, RedisConn::Single(_))
    }

    /// Charges `cost` on every limit of every subject, or on none; the
    /// subjects' state lives under the hash tag `placement`. Until
    /// `drained_until_us` (Redis time), subjects without state start empty.
    /// With `money` (only where [`RedisLimiter::decides_money`]), its
    /// budgets and account are checked first and reserved with the limits,
    /// in the same call.
    pub async fn admit(
        &self,
        placement: &str,
        subjects: &[(Subject, LimitSet)],
        cost: Cost,
        drained_until_us: u64,
        money: Option<MoneyCharge<'_>>,
    ) -> Result<Admitted, Error> {
        let mut call = self.admit.prepare_invoke();
        for k in self.keys(placement, subjects) {
            call.key(k);
        }
        call.arg(cost.requests)
            .arg(cost.tokens)
            .arg(drained_until_us)
            .arg(subjects.len());
        for (_, limits) in subjects {
            for kind in LimitKind::ALL {
                call.arg(
                    limits
                        .get(kind)
                        .map_or(-1, |a| a.min(i64::MAX as u64) as i64),
                );
            }
        }
        if let Some(m) = &money {
            m.add_to(&mut call, &self.prefix);
        }
        let started = std::time::Instant::now();
        let reply: Result<Vec<i64>, _> = call.invoke_async(&mut self.conn.clone()).await;
        metrics::histogram!("tollgate_redis_seconds", "op" => "admit").record(started.elapsed());
        let reply = reply.map_err(|e| {
            metrics::counter!("tollgate_redis_errors_total").increment(1);
            Error::Redis(e)
        })?;
        let bad = || Error::Redis(redis_reply_error(&reply));
        match (reply.first(), money) {
            (Some(2), Some(m)) => Ok(Admitted::Money(m.refusal(reply.get(2..).unwrap_or(&[]))?)),
            (Some(1), Some(_)) => {
                let mut d = decode(&reply).ok_or_else(bad)?;
                d.money = Some(reply.get(14..).and_then(money::left_of).ok_or_else(bad)?);
                Ok(Admitted::Decided(d))
            }
            _ => decode(&reply).map(Admitted::Decided).ok_or_else(bad),
        }
    }

    /// Announces replica `id` (alive for `alive` after this) and reads how
    /// many replicas are alive and which state Redis holds; `new_epoch`
    /// becomes the state's token if Redis has none.
    pub async fn heartbeat(
        &self,
        id: &str,
        new_epoch: &str,
        alive: Duration,
    ) -> Result<Beat, Error> {
        let mut call = self.heartbeat.prepare_invoke();
        call.key(format!("{}:{{replicas}}:live", self.prefix))
            .key(format!("{}:{{replicas}}:epoch", self.prefix))
            .arg(id)
            .arg(new_epoch)
            .arg(alive.as_millis() as u64);
        let (live, now_us, epoch, set): (u64, u64, String, u8) = call
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(Error::Redis)?;
        Ok(Beat {
            live,
            now_us,
            epoch,
            set_epoch: set == 1,
        })
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> Result<(), Error> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.conn.clone())
            .await
            .map(drop)
            .map_err(Error::Redis)
    }

    /// Corrects the token charge of a request admitted at `admitted_at`
    /// (the [`Decision::at`] of its admission) by `delta` tokens.
    pub async fn reconcile(
        &self,
        placement: &str,
        subjects: &[(Subject, LimitSet)],
        delta: i64,
        admitted_at: u64,
    ) -> Result<(), Error> {
        if delta == 0 {
            return Ok(());
        }
        let mut call = self.reconcile.prepare_invoke();
        for k in self.keys(placement, subjects) {
            call.key(k);
        }
        call.arg(delta).arg(admitted_at / 1_000);
        for (_, limits) in subjects {
            for amount in [limits.tpm, limits.tpd] {
                call.arg(amount.map_or(-1, |a| a.min(i64::MAX as u64) as i64));
            }
        }
        let started = std::time::Instant::now();
        let reply: Result<i64, _> = call.invoke_async(&mut self.conn.clone()).await;
        metrics::histogram!("tollgate_redis_seconds", "op" => "reconcile")
            .record(started.elapsed());
        reply.map(drop).map_err(|e| {
            metrics::counter!("tollgate_redis_errors_total").increment(1);
            Error::Redis(e)
        })
    }
}

fn redis_reply_error(reply: &[i64]) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "the admission script answered an unexpected shape",
        format!("{} values", reply.len()),
    ))
}

fn kind_of(n: i64) -> Option<LimitKind> {
    LimitKind::ALL.get(usize::try_from(n - 1).ok()?).copied()
}

fn micros(n: i64) -> Duration {
    Duration::from_micros(n.max(0) as u64)
}

/// Two readings (requests, tokens) of six values each.
fn readings(v: &[i64]) -> Option<Grant> {
    let one = |r: &[i64]| -> Option<Option<Reading>> {
        if r[0] == 0 {
            return Some(None);
        }
        Some(Some(Reading {
            kind: kind_of(r[1])?,
            subject: usize::try_from(r[2]).ok()?,
            limit: r[3].max(0) as u64,
            remaining: r[4].max(0) as u64,
            reset: micros(r[5]),
        }))
    };
    Some(Grant {
        requests: one(v.get(0..6)?)?,
        tokens: one(v.get(6..12)?)?,
    })
}

fn decode(v: &[i64]) -> Option<Decision> {
    let at = (*v.get(1)?).max(0) as u64 * 1_000;
    if *v.first()? == 1 {
        return Some(Decision {
            result: Ok(readings(v.get(2..14)?)?),
            at,
            local: false,
            money: None,
        });
    }
    let f = v.get(2..9)?;
    let why = match f[2] {
        0 => RefusalKind::Wait(micros(f[3])),
        1 => RefusalKind::DailyCap(micros(f[3])),
        _ => RefusalKind::NeverFits,
    };
    Some(Decision {
        result: Err(Refusal {
            subject: usize::try_from(f[0]).ok()?,
            kind: kind_of(f[1])?,
            why,
            limit: f[4].max(0) as u64,
            used: f[5].max(0) as u64,
            requested: f[6].max(0) as u64,
            standing: readings(v.get(9..21)?)?,
        }),
        at,
        local: false,
        money: None,
    })
}

/// Scratch Redis Clusters for tests: three masters on free ports, torn
/// down when dropped.
#[doc(hidden)]
pub mod scratch {
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    /// A running cluster; its processes and files go when it is dropped.
    pub struct Cluster {
        children: Vec<Child>,
        dir: std::path::PathBuf,
        /// Its nodes as a `redis_url` for cluster mode.
        pub url: String,
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            for c in &mut self.children {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port: {e}"))
    }

    fn run(cmd: &mut Command) -> String {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("{cmd:?} (needs redis-cli): {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts three `redis-server`s in cluster mode and joins them; panics,
    /// loudly, when the binaries are missing or the cluster never forms.
    pub fn cluster() -> Cluster {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tollgate-cluster-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::create_dir_all(&dir);
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut cluster = Cluster {
            children: Vec::new(),
            dir: dir.clone(),
            url: ports
                .iter()
                .map(|p| format!("redis://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(","),
        };
        for p in &ports {
            let child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(format!("nodes-{p}.conf"))
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(&dir)
                .stdout(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("redis-server starts (cluster tests need it): {e}"));
            cluster.children.push(child);
        }
        for p in &ports {
            let up = (0..200).any(|_| {
                std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok() || {
                    std::thread::sleep(Duration::from_millis(20));
                    false
                }
            });
            assert!(up, "cluster node {p} never listened");
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        run(Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"]));
        // Every node must agree that all slots are served.
        let formed = (0..300).any(|_| {
            let ok = ports.iter().all(|p| {
                run(Command::new("redis-cli").args(["-p", &p.to_string(), "cluster", "info"]))
                    .contains("cluster_state:ok")
            });
            if !ok {
                std::thread::sleep(Duration::from_millis(50));
            }
            ok
        });
        assert!(formed, "the cluster on {nodes:?} never formed");
        cluster
    }
}
