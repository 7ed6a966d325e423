//! One suite of database behaviour (keys, money, the ledger and its
//! reports), run unchanged against a SQLite file and against the real
//! PostgreSQL on this machine (127.0.0.1:5432, or
//! `TOLLGATE_TEST_POSTGRES_URL`), each test on a database of its own. A
//! PostgreSQL that cannot be reached fails its half loudly.

use std::sync::Arc;
use std::time::Duration;
use tollgate_core::limits::KeyLimits;
use tollgate_store::database::{Backend, scratch};
use tollgate_store::keys::{LimitsUpdate, NewKey};
use tollgate_store::ledger::{GroupBy, HoldRow, UsageLine, UsagePoint};
use tollgate_store::money::SpendColumn;
use tollgate_store::{Database, Error, Ledger, SecretHash, UsageRow};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;

/// A place for one test's database on `backend`, and its URL; the
/// directory holds the SQLite file.
async fn scratch_url(backend: Backend) -> Result<(tempfile::TempDir, String), Error> {
    let dir = tempfile::tempdir().map_err(|e| Error::Random(e.to_string()))?;
    let url = match backend {
        Backend::Sqlite => dir.path().join("t.db").to_string_lossy().into_owned(),
        Backend::Postgres => scratch::postgres().await,
    };
    Ok((dir, url))
}

/// A database for one test, on `backend`; the directory holds the SQLite file.
async fn open(backend: Backend) -> Result<(tempfile::TempDir, Database), Error> {
    let (dir, url) = scratch_url(backend).await?;
    let db = Database::open(&url).await?;
    assert_eq!(db.backend(), backend);
    Ok((dir, db))
}

/// A served gpt-4o-mini request charged to the `acme` account.
fn acme_row(request_id: &str, at: i64, cost: i64) -> UsageRow {
    UsageRow {
        request_id: request_id.into(),
        at,
        account: Some(Arc::from("acme")),
        model: Arc::from("gpt-4o-mini"),
        cost,
        status: 200,
        ..UsageRow::default()
    }
}

async fn created_key_is_found_by_its_secret_hash_only(backend: Backend) -> Result<(), Error> {
    let (_dir, db) = open(backend).await?;
    let (rec, secret) = db
        .create_key(NewKey {
            name: "web".into(),
            models: Some(vec!["gpt-4o".into()]),
            expires_at: None,
            team: Some("search".into()),
            limits: KeyLimits {
                tpm: Some(30_000),
                ..KeyLimits::default()
            },
            ..NewKey::default()
        })
        .await?;
    let found = db
        .find_key_by_hash(&SecretHash::of(secret.expose()))
        .await?;
    assert_eq!(found.as_ref(), Some(&rec));
    assert!(
        db.find_key_by_hash(&SecretHash::of("tg-wrong"))
            .await?
            .is_none()
    );
    assert!(rec.allows_model("gpt-4o") && !rec.allows_model("gpt-4.1"));
    let v = db.keys_version().await?;
    let updated = db
        .update_key_limits(
            "web",
            LimitsUpdate {
                preset: Some(Some("dev".into())),
                ..LimitsUpdate::default()
            },
        )
        .await?;
    assert_ne!(v, db.keys_version().await?, "an edit moves the version");
    let stored = db.find_key("web").await?;
    assert_eq!(stored, updated);
    assert_eq!(
        (
            stored.preset.as_deref(),
            stored.team.as_deref(),
            stored.limits.tpm
        ),
        (Some("dev"), Some("search"), Some(30_000))
    );
    Ok(())
}

async fn revoke_and_rotate_change_the_version(backend: Backend) -> Result<(), Error> {
    let (_dir, db) = open(backend).await?;
    let v0 = db.keys_version().await?;
    let (_, old) = db
        .create_key(NewKey {
            name: "a".into(),
            ..NewKey::default()
        })
        .await?;
    let v1 = db.keys_version().await?;
    assert_ne!(v0, v1);
    let (rotated, new) = db.rotate_key("a").await?;
    assert!(
        db.find_key_by_hash(&old.hash()).await?.is_none(),
        "old secret is gone"
    );
    assert_eq!(
        db.find_key_by_hash(&new.hash()).await?.map(|k| k.id),
        Some(rotated.id.clone())
    );
    let revoked = db.revoke_key("a").await?;
    assert!(revoked.revoked_at.is_some());
    assert!(matches!(db.find_key("a").await, Err(Error::KeyNotFound(_))));
    // The name is free again once its key is revoked.
    db.create_key(NewKey {
        name: "a".into(),
        ..NewKey::default()
    })
    .await?;
    assert!(matches!(
        db.create_key(NewKey {
            name: "a".into(),
            ..NewKey::default()
        })
        .await,
        Err(Error::DuplicateName(_))
    ));
    Ok(())
}

async fn batches_commit_rows_holds_and_balances_together(backend: Backend) -> Result<(), Error> {
    let (_dir, db) = open(backend).await?;
    db.add_credits("acme", 1_000, "test", "seed").await?;
    let ledger = Ledger::start_with(&db, Duration::ZERO)?;
    let hold = |id: &str| HoldRow {
        request_id: id.into(),
        account: Arc::from("acme"),
        amount: 100,
        at: 1,
    };
    let row = |id: &str, cost, held| UsageRow {
        held,
        ..acme_row(id, 2, cost)
    };
    // `a` settles after its hold was written (a flush writes every hold
    // open so long, here none at all); `b` is still in flight.
    let a = ledger.hold(hold("a"));
    let _b = ledger.hold(hold("b"));
    ledger.flush().await;
    assert!(a.settle(), "a flushed hold is written");
    ledger.record(row("a", 40, true)).wait().await;
    // `c` holds and settles at once (written or not yet).
    let c = ledger.hold(hold("c"));
    ledger.record(row("c", 60, c.settle())).wait().await;
    // `d` is refused after its hold was written: dropping it clears it.
    let d = ledger.hold(hold("d"));
    ledger.flush().await;
    drop(d);
    if backend == Backend::Sqlite {
        // Durable once journaled, committed with the next batch.
        let journaled: Vec<_> = db
            .journaled_rows()?
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        assert_eq!(journaled, ["a", "c"]);
    }
    ledger.flush().await;
    assert_eq!(db.find_account("acme").await?.balance, 900);
    let rows = db.usage_rows().await?;
    assert_eq!(rows.len(), 2);
    let stale = db.release_stale_holds().await?;
    assert_eq!(
        stale
            .iter()
            .map(|h| h.request_id.as_str())
            .collect::<Vec<_>>(),
        ["b"]
    );
    Ok(())
}

/// A hold is written only once its request has been in flight for the
/// threshold, by the writer on its own: an idle writer is woken by the
/// first hold and looks again when that hold is due.
async fn holds_are_written_once_aged_without_other_traffic(backend: Backend) -> Result<(), Error> {
    let (_dir, db) = open(backend).await?;
    let hold = |id: &str| HoldRow {
        request_id: id.into(),
        account: Arc::from("acme"),
        amount: 100,
        at: 1,
    };
    // Far from its threshold, a flushed hold stays in memory.
    let young = Ledger::start_with(&db, Duration::from_secs(3600))?;
    let y = young.hold(hold("young"));
    young.flush().await;
    assert!(db.release_stale_holds().await?.is_empty());
    assert!(!y.settle(), "an unwritten hold needs no clearing");

    let ledger = Ledger::start_with(&db, Duration::from_millis(50))?;
    let aged = ledger.hold(hold("aged"));
    // Nothing else reaches the writer: it must write the hold by itself.
    // (Polled: the writer gives no signal outside a flush, which would
    // write the hold before its time.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut written = Vec::new();
    while written.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        written = db.release_stale_holds().await?;
    }
    let ids: Vec<_> = written.iter().map(|h| h.request_id.as_str()).collect();
    assert_eq!(ids, ["aged"]);
    assert!(aged.settle(), "a written hold is cleared with its row");
    Ok(())
}

/// The series the dashboard draws, read from the per-minute or per-hour
/// rollups, sum per bucket exactly what the rows hold, across batches.
async fn rollups_sum_exactly_what_the_rows_hold(backend: Backend) -> Result<(), Error> {
    let (_dir, db) = open(backend).await?;
    let ledger = Ledger::start(&db)?;
    let t0 = 1_800_000_000_000 - 1_800_000_000_000 % HOUR_MS;
    // 500 rows over three hours, two keys, two models, with and without
    // a team, in many batches (flushes split them), so that groups are
    // updated across batches.
    for i in 0..500_i64 {
        ledger.record_detached(UsageRow {
            request_id: format!("r{i}"),
            at: t0 + i * 23_456,
            key_name: Some(Arc::from(if i % 3 == 0 { "web" } else { "batch" })),
            team: (i % 5 == 0).then(|| Arc::from("search")),
            model: Arc::from(if i % 2 == 0 { "gpt-4o" } else { "gpt-4o-mini" }),
            input_tokens: i as u64,
            cached_tokens: if i % 4 == 0 { i as u64 / 2 } else { 0 },
            output_tokens: 2 * i as u64,
            cost: 7 * i,
            status: 200,
            ..UsageRow::default()
        });
        if i % 37 == 0 {
            ledger.flush().await;
        }
    }
    ledger.flush().await;
    let rows = db.usage_rows().await?;
    assert_eq!(rows.len(), 500);
    // The dashboard's series, from the minutes or the hours, per bucket.
    let until = t0 + 4 * HOUR_MS;
    for bucket in [MINUTE_MS, 15 * MINUTE_MS, HOUR_MS] {
        let mut expected: std::collections::BTreeMap<i64, UsagePoint> = Default::default();
        for r in &rows {
            let at = r.at - r.at % bucket;
            let p = expected.entry(at).or_insert(UsagePoint {
                at,
                ..UsagePoint::default()
            });
            p.requests += 1;
            p.input_tokens += r.input_tokens as i64;
            p.cached_tokens += r.cached_tokens as i64;
            p.output_tokens += r.output_tokens as i64;
            p.cost += r.cost;
        }
        let expected: Vec<_> = expected.into_values().collect();
        assert_eq!(
            db.usage_series(t0, until, bucket).await?,
            expected,
            "bucket {bucket}"
        );
    }
    Ok(())
}

async fn budgets_accounts_and_spend_round_trip(backend: Backend) -> Result<(), Error> {
    use tollgate_core::money::{Budget, Window};
    let (_dir, db) = open(backend).await?;
    let budget = |scope: &str, cap| Budget {
        scope: Arc::from(scope),
        window: Window::Day,
        cap,
        alert_percent: Some(80),
    };
    let v0 = db.budgets_version().await?;
    db.set_budget(&budget("team:search", 10_000)).await?;
    db.set_budget(&budget("team:search", 20_000)).await?;
    db.set_budget(&budget("org", 1_000_000)).await?;
    let v1 = db.budgets_version().await?;
    assert_ne!(v0, v1);
    let listed = db.list_budgets().await?;
    assert_eq!(
        listed,
        [budget("org", 1_000_000), budget("team:search", 20_000)]
    );
    assert!(db.remove_budget("org", Window::Day).await?);
    assert!(!db.remove_budget("org", Window::Day).await?);
    assert_ne!(db.budgets_version().await?, v1);

    let first = db.add_credits("acme", 5_000_000, "ops", "seed").await?;
    let second = db.add_credits("acme", -250, "ops", "refund fix").await?;
    assert!(second.id > first.id);
    db.set_low_balance("acme", Some(1_000)).await?;
    let acme = db.find_account("acme").await?;
    assert_eq!((acme.balance, acme.low_balance), (4_999_750, Some(1_000)));
    assert!(matches!(
        db.find_account("nobody").await,
        Err(Error::AccountNotFound(_))
    ));
    let entries = db.credit_entries(Some("acme"), 0).await?;
    assert_eq!(
        entries.iter().map(|e| e.amount).collect::<Vec<_>>(),
        [5_000_000, -250]
    );
    assert_eq!(db.credit_entries(None, first.id).await?.len(), 1);
    assert_eq!(db.last_credit_entry().await?, second.id);

    // Settled usage is what spend sums: per team, per user, for the org.
    let ledger = Ledger::start(&db)?;
    for (i, (team, user, cost)) in [
        ("search", "ann", 100),
        ("search", "bob", 20),
        ("ads", "ann", 3),
    ]
    .into_iter()
    .enumerate()
    {
        ledger.record_detached(UsageRow {
            request_id: format!("r{i}"),
            at: 1_000 + i as i64,
            team: Some(Arc::from(team)),
            user: Some(user.to_owned()),
            account: Some(Arc::from("acme")),
            model: Arc::from("gpt-4o-mini"),
            cost,
            status: 200,
            streamed: i == 1,
            ..UsageRow::default()
        });
    }
    ledger.flush().await;
    assert_eq!(
        db.spend_since(SpendColumn::Team, Some("search"), 0).await?,
        [("team:search".to_owned(), 120)]
    );
    let mut users = db.spend_since(SpendColumn::User, None, 0).await?;
    users.sort();
    assert_eq!(
        users,
        [("user:ann".to_owned(), 103), ("user:bob".to_owned(), 20)]
    );
    assert_eq!(
        db.spend_since(SpendColumn::Org, None, 0).await?,
        [("org".to_owned(), 123)]
    );
    assert_eq!(
        db.spend_since(SpendColumn::Org, None, 5_000).await?,
        [("org".to_owned(), 0)]
    );
    assert_eq!(db.find_account("acme").await?.balance, 4_999_750 - 123);
    let rows = db.usage_rows().await?;
    assert_eq!(
        rows.iter().map(|r| r.streamed).collect::<Vec<_>>(),
        [false, true, false]
    );
    let days = db.usage_report(GroupBy::Day, 0, 10_000).await?;
    assert_eq!(days.len(), 1);
    assert_eq!(
        (days[0].group.as_str(), days[0].requests, days[0].cost),
        ("1970-01-01", 3, 123)
    );
    Ok(())
}

/// Budgets are seeded from the hourly rollups where they can answer: the
/// sums are the rows' own, for every scope and window start, and where a
/// `-` in the rollups could mean a key named `-` rather than none, from
/// the rows.
async fn spend_sums_are_the_rows_whichever_table_answers(backend: Backend) -> Result<(), Error> {
    let (_dir, db) = open(backend).await?;
    let ledger = Ledger::start(&db)?;
    let keys = ["web", "batch"];
    let teams = [Some("search"), None, Some("ads")];
    let users = [Some("ann"), None];
    let mut rows = Vec::new();
    // Seven hours of rows, some on an hour's first and last millisecond.
    for i in 0..61_i64 {
        let at = match i {
            0 => 0,
            1 => HOUR_MS - 1,
            2 => 3 * HOUR_MS,
            i => i * 7 * MINUTE_MS + i,
        };
        let row = UsageRow {
            request_id: format!("r{i}"),
            at,
            key_name: Some(Arc::from(keys[i as usize % 2])),
            team: teams[i as usize % 3].map(Arc::from),
            user: users[i as usize % 2].map(str::to_owned),
            model: Arc::from("gpt-4o-mini"),
            cost: i * 13 + 1,
            status: 200,
            ..UsageRow::default()
        };
        ledger.record_detached(row.clone());
        rows.push(row);
    }
    ledger.flush().await;

    let expected = |rows: &[UsageRow], since: i64, scope: &dyn Fn(&UsageRow) -> Option<String>| {
        let mut sums = std::collections::BTreeMap::<String, i64>::new();
        for r in rows.iter().filter(|r| r.at >= since) {
            if let Some(s) = scope(r) {
                *sums.entry(s).or_default() += r.cost;
            }
        }
        sums.into_iter().collect::<Vec<_>>()
    };
    let sorted = |mut v: Vec<(String, i64)>| {
        v.sort();
        v
    };
    let key = |r: &UsageRow| r.key_name.as_deref().map(|k| format!("key:{k}"));
    let team = |r: &UsageRow| r.team.as_deref().map(|t| format!("team:{t}"));
    let user = |r: &UsageRow| r.user.as_deref().map(|u| format!("user:{u}"));
    // Hour starts (the rollups), and two that are not (the rows).
    for since in [
        0,
        HOUR_MS,
        3 * HOUR_MS,
        6 * HOUR_MS,
        3 * HOUR_MS + 1,
        HOUR_MS - 1,
    ] {
        let org: i64 = rows.iter().filter(|r| r.at >= since).map(|r| r.cost).sum();
        assert_eq!(
            db.spend_since(SpendColumn::Org, None, since).await?,
            [("org".to_owned(), org)],
            "org since {since}"
        );
        assert_eq!(
            sorted(db.spend_since(SpendColumn::Key, None, since).await?),
            expected(&rows, since, &key),
            "keys since {since}"
        );
        assert_eq!(
            sorted(db.spend_since(SpendColumn::Team, None, since).await?),
            expected(&rows, since, &team),
            "teams since {since}"
        );
        assert_eq!(
            sorted(db.spend_since(SpendColumn::User, None, since).await?),
            expected(&rows, since, &user),
            "users since {since}"
        );
        let search = expected(&rows, since, &|r| team(r).filter(|t| t == "team:search"));
        assert_eq!(
            db.spend_since(SpendColumn::Team, Some("search"), since)
                .await?,
            search,
            "team:search since {since}"
        );
    }

    // A key named `-`, and a row with no key name: the rollups hold both
    // under `-`, the rows tell them apart.
    db.create_key(NewKey {
        name: "-".into(),
        ..NewKey::default()
    })
    .await?;
    for (i, name) in [(100, Some("-")), (101, None)] {
        let row = UsageRow {
            request_id: format!("r{i}"),
            at: 4 * HOUR_MS,
            key_name: name.map(Arc::from),
            model: Arc::from("gpt-4o-mini"),
            cost: 1_000 * i,
            status: 200,
            ..UsageRow::default()
        };
        ledger.record_detached(row.clone());
        rows.push(row);
    }
    ledger.flush().await;
    assert_eq!(
        db.spend_since(SpendColumn::Key, Some("-"), 0).await?,
        [("key:-".to_owned(), 100_000)]
    );
    assert_eq!(
        sorted(db.spend_since(SpendColumn::Key, None, 0).await?),
        expected(&rows, 0, &key)
    );
    Ok(())
}

/// `rows`' usage over `[since, until)` grouped as `usage_report` groups
/// it, worked out here from the rows themselves.
fn report_of(rows: &[UsageRow], by: GroupBy, since: i64, until: i64) -> Vec<UsageLine> {
    let mut lines: std::collections::BTreeMap<String, UsageLine> = Default::default();
    let named = |v: Option<&str>| v.unwrap_or("-").to_owned();
    for r in rows.iter().filter(|r| r.at >= since && r.at < until) {
        let group = match by {
            GroupBy::Key => named(r.key_name.as_deref()),
            GroupBy::Team => named(r.team.as_deref()),
            GroupBy::User => named(r.user.as_deref()),
            GroupBy::Account => named(r.account.as_deref()),
            GroupBy::Model => r.model.to_string(),
            GroupBy::Day => tollgate_core::money::format_utc(r.at as u64 * 1_000_000)[..10].into(),
        };
        let line = lines.entry(group.clone()).or_insert(UsageLine {
            group,
            requests: 0,
            input_tokens: 0,
            cached_tokens: 0,
            output_tokens: 0,
            cost: 0,
        });
        line.requests += 1;
        line.input_tokens += r.input_tokens as i64;
        line.cached_tokens += r.cached_tokens as i64;
        line.output_tokens += r.output_tokens as i64;
        line.cost += r.cost;
    }
    let mut lines: Vec<_> = lines.into_values().collect();
    lines.sort_by(|a, b| b.cost.cmp(&a.cost).then_with(|| a.group.cmp(&b.group)));
    lines
}

/// 700 rows, one every 6 min 11.3 s over three days and two UTC midnights,
/// every column varied (none included), journaled and committed in many
/// batches.
async fn seventy_hours_of_rows(db: &Database) -> Result<Vec<UsageRow>, Error> {
    let ledger = Ledger::start(db)?;
    let t0 = 1_800_000_000_000 - 1_800_000_000_000 % (24 * HOUR_MS) - 5 * HOUR_MS + 17_345;
    let pick = |i: i64, names: &[&str]| {
        let name = names[i as usize % names.len()];
        (!name.is_empty()).then(|| Arc::from(name))
    };
    for i in 0..700_i64 {
        ledger.record_detached(UsageRow {
            request_id: format!("r{i}"),
            at: t0 + i * 371_300,
            key_name: pick(i, &["web", "batch", ""]),
            team: pick(i / 2, &["search", "", "ads", "-"]),
            user: pick(i, &["ann", "bob", "", "cy", "dee"]).map(|u| u.to_string()),
            account: pick(i / 3, &["acme", ""]),
            model: Arc::from(if i % 2 == 0 { "gpt-4o" } else { "gpt-4o-mini" }),
            input_tokens: 100 + i as u64,
            cached_tokens: if i % 3 == 0 { i as u64 / 3 } else { 0 },
            output_tokens: 3 * i as u64 + 1,
            cost: 11 * i + 5,
            status: 200,
            ..UsageRow::default()
        });
        if i % 41 == 0 {
            ledger.flush().await;
        }
    }
    ledger.flush().await;
    db.usage_rows().await
}

/// Reports by key, team, account, model or day read whole minutes and
/// hours from the rollups and the ragged edges from the rows: for windows
/// on and off every boundary, they sum exactly what the rows hold, as do
/// reports by end user, which read the rows alone.
async fn reports_sum_what_the_rows_hold_for_any_window(backend: Backend) -> Result<(), Error> {
    let (_dir, db) = open(backend).await?;
    let rows = seventy_hours_of_rows(&db).await?;
    assert_eq!(rows.len(), 700);
    let (first, last) = (rows[0].at, rows[699].at);
    let day = |t: i64| t - t.rem_euclid(24 * HOUR_MS);
    let mut windows = vec![
        (0, i64::MAX),
        (day(first), day(last)),
        (day(first) + 24 * HOUR_MS, i64::MAX),
        (first, last),
        (first + 1, last),
        (first + HOUR_MS, first + 2 * HOUR_MS),
        (first + 30_000, first + 90_000),
        (first + 7 * MINUTE_MS, first + 7 * MINUTE_MS + 59_999),
        (last, first),
    ];
    // And fifty more, from a fixed seed, ragged at either end or not.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |below: i64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % below as u64) as i64
    };
    let span = last - first + 2 * HOUR_MS;
    for i in 0..50 {
        let since = first - HOUR_MS + next(span);
        let until = since + next(span / 2);
        let align = |t: i64, width: i64| {
            if i % 3 == 0 {
                t - t.rem_euclid(width)
            } else {
                t
            }
        };
        windows.push((align(since, MINUTE_MS), align(until, HOUR_MS)));
    }
    for (since, until) in windows {
        for by in [
            GroupBy::Key,
            GroupBy::Team,
            GroupBy::User,
            GroupBy::Model,
            GroupBy::Account,
            GroupBy::Day,
        ] {
            assert_eq!(
                db.usage_report(by, since, until).await?,
                report_of(&rows, by, since, until),
                "{by:?} over [{since}, {until})"
            );
        }
    }
    Ok(())
}

/// A database from before the rollups were kept by account and with
/// cached tokens gets them, from its rows, when this version opens it.
async fn an_older_database_gets_its_rollups_by_account(backend: Backend) -> Result<(), Error> {
    use sqlx::Connection;
    let (_dir, url) = scratch_url(backend).await?;
    let db = Database::open(&url).await?;
    let rows = seventy_hours_of_rows(&db).await?;
    db.close().await;
    // Back to version 4: its rollups, as it built them from the rows.
    let raw_url = match backend {
        Backend::Sqlite => format!("sqlite:{url}"),
        Backend::Postgres => url.clone(),
    };
    let mut conn = sqlx::AnyConnection::connect(&raw_url).await?;
    for (table, width) in [("usage_minutes", MINUTE_MS), ("usage_hours", HOUR_MS)] {
        for sql in [
            format!("DROP TABLE {table}"),
            format!(
                "CREATE TABLE {table} (at BIGINT NOT NULL, key_name TEXT NOT NULL, team TEXT NOT NULL, \
                 model TEXT NOT NULL, requests BIGINT NOT NULL, input_tokens BIGINT NOT NULL, \
                 output_tokens BIGINT NOT NULL, cost_micros BIGINT NOT NULL, \
                 PRIMARY KEY (at, key_name, team, model))"
            ),
            format!(
                "INSERT INTO {table} SELECT at - at % {width}, COALESCE(key_name, '-'), \
                 COALESCE(team, '-'), model, COUNT(*), SUM(input_tokens), SUM(output_tokens), \
                 SUM(cost_micros) FROM usage GROUP BY 1, 2, 3, 4"
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await?;
        }
    }
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 5")
        .execute(&mut conn)
        .await?;
    conn.close().await?;

    let db = Database::open(&url).await?;
    // Whole hours: read from the rollups alone.
    let since = rows[0].at - rows[0].at.rem_euclid(HOUR_MS) + HOUR_MS;
    let until = rows[699].at - rows[699].at.rem_euclid(HOUR_MS);
    for by in [GroupBy::Account, GroupBy::Model, GroupBy::Day] {
        let lines = db.usage_report(by, since, until).await?;
        assert_eq!(lines, report_of(&rows, by, since, until), "{by:?}");
        assert!(lines.iter().any(|l| l.cached_tokens > 0));
    }
    Ok(())
}

/// Runs each scenario on a SQLite file and on PostgreSQL.
macro_rules! on_both_databases {
    ($($scenario:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test]
            async fn $scenario() -> Result<(), tollgate_store::Error> {
                super::$scenario(super::Backend::Sqlite).await
            })*
        }
        mod on_postgres {
            $(#[tokio::test]
            async fn $scenario() -> Result<(), tollgate_store::Error> {
                super::$scenario(super::Backend::Postgres).await
            })*
        }
    };
}

on_both_databases!(
    created_key_is_found_by_its_secret_hash_only,
    revoke_and_rotate_change_the_version,
    batches_commit_rows_holds_and_balances_together,
    holds_are_written_once_aged_without_other_traffic,
    rollups_sum_exactly_what_the_rows_hold,
    budgets_accounts_and_spend_round_trip,
    spend_sums_are_the_rows_whichever_table_answers,
    reports_sum_what_the_rows_hold_for_any_window,
    an_older_database_gets_its_rollups_by_account,
);

/// WAL with `synchronous = NORMAL` on every connection (the pool's and the
/// ledger writer's): durable against a killed process, and a commit does
/// not wait for an fsync.
#[tokio::test]
async fn sqlite_connections_run_in_wal_with_normal_sync() -> Result<(), Error> {
    let (_dir, db) = open(Backend::Sqlite).await?;
    let (mode, sync) = db.sqlite_settings().await?;
    assert_eq!((mode.as_str(), sync), ("wal", 1));
    Ok(())
}

/// A row is durable once journaled. A run killed before committing leaves
/// its rows in the journal; the next start commits those SQLite lacks
/// (each once, with its account debit) and deletes the segment.
#[tokio::test]
async fn journaled_rows_a_killed_run_left_are_committed_once_at_start() -> Result<(), Error> {
    let (dir, db) = open(Backend::Sqlite).await?;
    db.add_credits("acme", 1_000, "test", "seed").await?;
    let row = |id: &str, cost| acme_row(id, 5, cost);
    // `a` made it into SQLite before the kill; `b` and `c` only into the
    // journal (a segment of an earlier run, as the kill left it).
    let ledger = Ledger::start(&db)?;
    ledger.record(row("a", 100)).wait().await;
    ledger.flush().await;
    drop(ledger);
    let segment = dir.path().join("t.db-ledger.7");
    let mut lines = String::new();
    for r in [row("a", 100), row("b", 20), row("c", 30)] {
        lines.push_str(&serde_json::to_string(&r).map_err(|e| Error::Writer(e.to_string()))?);
        lines.push('\n');
    }
    // A line torn by an OS crash mid-write is skipped.
    lines.push_str("{\"request_id\":\"d\",\"at\"");
    std::fs::write(&segment, lines).map_err(|e| Error::Writer(e.to_string()))?;
    // A segment another gateway on this database still appends to (it
    // holds the lock): not a leftover, left alone.
    let live = dir.path().join("t.db-ledger.6");
    let line = serde_json::to_string(&row("e", 1)).map_err(|e| Error::Writer(e.to_string()))?;
    std::fs::write(&live, line + "\n").map_err(|e| Error::Writer(e.to_string()))?;
    let other_gateway = std::fs::File::open(&live).map_err(|e| Error::Writer(e.to_string()))?;
    other_gateway
        .try_lock()
        .map_err(|e| Error::Writer(e.to_string()))?;

    let ledger = Ledger::start(&db)?;
    ledger.flush().await;
    let mut ids: Vec<_> = db
        .usage_rows()
        .await?
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(db.find_account("acme").await?.balance, 1_000 - 150);
    assert!(!segment.exists(), "the recovered segment is deleted");
    assert!(live.exists(), "a live gateway's segment is not recovered");
    Ok(())
}
