//! Budgets, credits and the ledger through the gateway over real HTTP, with
//! the expected numbers computed from the shipped price table.

mod common;

use common::{ADMIN_KEY, Harness, error_of, parse_sse};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use tollgate_core::clock::FakeClock;
use tollgate_core::limits::calendar::DAY_NS;
use tollgate_core::money::{Budget, Micros, PriceTable, TokenUsage, Window, parse_usd};
use tollgate_gateway::config::TeamConfig;
use tollgate_mock::MockConfig;

/// Noon UTC on a fixed day.
fn noon() -> FakeClock {
    FakeClock::new(20_000 * DAY_NS + DAY_NS / 2)
}

fn chat(model: &str, max_tokens: u64) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"Count the cost of this"}}],"max_tokens":{max_tokens}}}"#
    )
}

/// The cost of `usage` (an OpenAI usage block) at the shipped price of `model`.
fn priced(model: &str, usage: &serde_json::Value) -> Micros {
    let table = PriceTable::with_overrides(&BTreeMap::new()).expect("shipped prices");
    let n = |f: &str| usage[f].as_u64().expect("token count");
    table.get(model).expect("priced model").cost(TokenUsage {
        input: n("prompt_tokens"),
        cached_input: 0,
        output: n("completion_tokens"),
    })
}

fn header_usd(resp: &reqwest::Response, name: &str) -> Option<Micros> {
    let v = resp.headers().get(name)?.to_str().ok()?;
    parse_usd(v).ok()
}

async fn set_budget(h: &Harness, scope: &str, window: Window, cap: Micros) {
    h.gw()
        .db
        .set_budget(&Budget {
            scope: Arc::from(scope),
            window,
            cap,
            alert_percent: None,
        })
        .await
        .expect("budget stored");
    h.gw().money.sync().await.expect("budgets reloaded");
}

#[tokio::test]
async fn a_team_budget_runs_out_after_the_expected_requests_and_a_new_day_lifts_it() {
    let clock = noon();
    let h = Harness::with_clock(
        MockConfig::default(),
        |c| {
            c.teams.insert("search".into(), TeamConfig::default());
        },
        clock.clone(),
    )
    .await;
    let team = |k: &mut tollgate_store::NewKey| k.team = Some("search".into());
    let keys = [h.key("search-a", team).await, h.key("search-b", team).await];
    let cap = 10_000; // $0.01
    set_budget(&h, "team:search", Window::Day, cap).await;
    let body = chat("gpt-4o-mini", 400);

    let first = h.post_as(&keys[0], "/v1/chat/completions", &body).await;
    assert_eq!(first.status(), 200);
    let charged = header_usd(&first, "x-tollgate-cost-usd").expect("cost header");
    let remaining = header_usd(&first, "x-tollgate-budget-remaining-usd").expect("budget header");
    let usage = first.json::<serde_json::Value>().await.expect("JSON")["usage"].clone();
    let cost = priced("gpt-4o-mini", &usage);
    assert_eq!(charged, cost, "the header is the price table's cost");
    assert_eq!(remaining, cap - cost);

    // Every request costs the same, so exactly cap / cost fit in a day.
    let expected = cap / cost;
    assert!(expected > 10, "a meaningful number of requests: {expected}");
    let mut served = 1;
    loop {
        // The two keys of the team alternate: they share one budget.
        let resp = h
            .post_as(&keys[served as usize % 2], "/v1/chat/completions", &body)
            .await;
        if resp.status() != 200 {
            let retry_after = resp.headers().get("retry-after").cloned();
            let (status, code, retry, body) = error_of(resp).await;
            assert_eq!(
                (status, code.as_str(), retry.as_str()),
                (429, "budget_exceeded", "false")
            );
            let e = &body["error"];
            assert_eq!(e["type"], "budget_exceeded");
            assert_eq!(e["scope"], "team:search");
            assert_eq!(e["cap_usd"], "0.010000");
            assert_eq!(e["resets_at"], "2024-10-05T00:00:00Z");
            assert_eq!(
                parse_usd(e["spent_usd"].as_str().expect("spent")),
                Ok(served * cost)
            );
            // Noon on the fake clock: 12 h to the window's reset.
            assert_eq!(
                retry_after.as_ref().and_then(|v| v.to_str().ok()),
                Some("43200")
            );
            break;
        }
        served += 1;
        assert!(served <= expected, "served past the budget");
    }
    assert_eq!(served, expected);
    assert_eq!(h.mock.stats().snapshot().received, expected as u64);

    clock.advance(std::time::Duration::from_nanos(DAY_NS / 2));
    let next_day = h.post_as(&keys[1], "/v1/chat/completions", &body).await;
    assert_eq!(next_day.status(), 200, "a new UTC day lifts the budget");
}

/// A `user:*` budget keeps a count per end user; once their day is over
/// the gateway forgets them (memory stays bounded by one day's users), and
/// a returning user meets the whole cap again.
#[tokio::test]
async fn end_users_of_an_ended_day_are_forgotten_and_start_afresh() {
    let clock = noon();
    let h = Harness::with_clock(MockConfig::default(), |_| {}, clock.clone()).await;
    let key = h.key("app", |_| {}).await;
    let cap = 10_000;
    set_budget(&h, "user:*", Window::Day, cap).await;
    let as_user = |user: &str| {
        format!(
            r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Count the cost of this"}}],"max_tokens":50,"user":"{user}"}}"#
        )
    };
    let mut cost = 0;
    for user in ["ann", "bob", "ann"] {
        let resp = h
            .post_as(&key, "/v1/chat/completions", &as_user(user))
            .await;
        assert_eq!(resp.status(), 200);
        cost = header_usd(&resp, "x-tollgate-cost-usd").expect("cost header");
    }
    assert!(cost > 0);
    assert_eq!(h.gw().money.forget_ended(), 0, "the day is still running");

    clock.advance(std::time::Duration::from_nanos(DAY_NS / 2));
    assert_eq!(h.gw().money.forget_ended(), 2, "ann's and bob's counts");
    let back = h
        .post_as(&key, "/v1/chat/completions", &as_user("ann"))
        .await;
    assert_eq!(back.status(), 200);
    assert_eq!(
        header_usd(&back, "x-tollgate-budget-remaining-usd"),
        Some(cap - cost),
        "a new day's count, from nothing"
    );
}

#[tokio::test]
async fn an_account_pays_until_402_and_a_top_up_lifts_it() {
    let h = Harness::start().await;
    let key = h.key("prepaid", |k| k.account = Some("acme".into())).await;
    h.fund("acme", 1_000).await;
    let body = chat("gpt-4o-mini", 100);

    let mut costs = Vec::new();
    let refused = loop {
        let resp = h.post_as(&key, "/v1/chat/completions", &body).await;
        if resp.status() != 200 {
            break resp;
        }
        let left = header_usd(&resp, "x-tollgate-credits-remaining-usd").expect("credits header");
        let usage = resp.json::<serde_json::Value>().await.expect("JSON")["usage"].clone();
        costs.push(priced("gpt-4o-mini", &usage));
        assert_eq!(left, 1_000 - costs.iter().sum::<Micros>());
        assert!(costs.len() < 100, "never refused");
    };
    let cost = costs[0];
    assert_eq!(
        costs.len() as Micros,
        1_000 / cost,
        "refused at the expected request"
    );
    let (status, code, retry, refusal) = error_of(refused).await;
    assert_eq!(
        (status, code.as_str(), retry.as_str()),
        (402, "insufficient_credits", "false")
    );
    assert_eq!(refusal["error"]["type"], "insufficient_credits");
    assert_eq!(refusal["error"]["account"], "acme");
    let balance = 1_000 - costs.iter().sum::<Micros>();
    assert_eq!(
        parse_usd(refusal["error"]["balance_usd"].as_str().expect("balance")),
        Ok(balance)
    );

    // A top-up through the admin API lifts it at once.
    let top_up = h
        .http
        .post(h.url("/admin/credits/acme"))
        .bearer_auth(ADMIN_KEY)
        .json(&serde_json::json!({"amount_usd": "0.01", "why": "test top-up"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(top_up.status(), 200);
    let after = h.post_as(&key, "/v1/chat/completions", &body).await;
    assert_eq!(after.status(), 200);

    // The ledger agrees: one row per served request, balance = credits − costs.
    let (rows, balance) = h.ledger("acme").await;
    assert_eq!(rows.len(), costs.len() + 1);
    let spent: Micros = rows.iter().map(|r| r.cost).sum();
    assert_eq!(balance, 1_000 + 10_000 - spent);
    assert!(
        rows.iter()
            .all(|r| r.account.as_deref() == Some("acme") && r.status == 200)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_cannot_overdraw_one_account() {
    let h = Arc::new(Harness::start().await);
    let key = Arc::new(h.key("hammer", |k| k.account = Some("shared".into())).await);
    let credits = 50_000; // $0.05
    h.fund("shared", credits).await;

    let clients = (0..64).map(|i| {
        let (h, key) = (h.clone(), key.clone());
        tokio::spawn(async move {
            let mut served = Vec::new();
            // Sizes vary per client, so requests of many costs race.
            let body = chat("gpt-4o-mini", 20 + (i % 8) * 40);
            loop {
                let resp = h.post_as(&key, "/v1/chat/completions", &body).await;
                match resp.status().as_u16() {
                    200 => {
                        let id = resp.headers()["x-request-id"]
                            .to_str()
                            .expect("id")
                            .to_owned();
                        let cost = header_usd(&resp, "x-tollgate-cost-usd").expect("cost");
                        served.push((id, cost));
                    }
                    402 => return served,
                    other => panic!("unexpected status {other}"),
                }
            }
        })
    });
    let mut served = Vec::new();
    for c in futures_util::future::join_all(clients).await {
        served.extend(c.expect("client ran"));
    }
    let (rows, balance) = h.ledger("shared").await;
    let spent: Micros = rows.iter().map(|r| r.cost).sum();
    assert!(balance >= 0, "overdrawn: {}", balance);
    assert_eq!(
        balance,
        credits - spent,
        "balance = top-ups − settled costs"
    );
    assert_eq!(
        h.gw().money.funds("shared").await.expect("funds readable"),
        Some((balance, 0)),
        "no hold left"
    );
    // Every answered request has exactly one row, and nothing else does.
    let ids: HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "a request id appears twice");
    assert_eq!(rows.len(), served.len());
    assert!(
        served.len() > 300,
        "the account paid for {} requests",
        served.len()
    );
    for (id, cost) in &served {
        let row = rows
            .iter()
            .find(|r| &r.request_id == id)
            .expect("row of a served request");
        assert_eq!(row.cost, *cost);
    }
    // The cheapest request no longer fits: the money is used up, not refused early.
    let cheapest = served.iter().map(|s| s.1).min().expect("some served");
    assert!(balance < cheapest * 3, "left {} unspent", balance);
}

#[tokio::test]
async fn a_streamed_answer_is_in_the_ledger_before_its_last_byte() {
    let h = Harness::start().await;
    let key = h.key("streamer", |k| k.account = Some("acme".into())).await;
    h.fund("acme", 1_000_000).await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"stream"}],"max_tokens":12,"stream":true}"#;
    let resp = h.post_as(&key, "/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let text = resp.text().await.expect("stream");
    let (content, usage, done, _) = parse_sse(&text);
    assert!(done && !content.is_empty());
    assert!(
        usage.is_none(),
        "the usage chunk the gateway asked for is not passed on"
    );

    // No flush: the row was durable (journaled) before [DONE] went out.
    let rows = h.gw().db.journaled_rows().expect("journal");
    let row = rows
        .iter()
        .find(|r| r.request_id == id)
        .expect("row is there");
    assert!(row.streamed);
    assert_eq!(row.output_tokens, 12);
    assert_eq!(row.served_model.as_deref(), Some("gpt-4o"));
    let table = PriceTable::with_overrides(&BTreeMap::new()).expect("prices");
    let price = table.get("gpt-4o").expect("priced");
    assert_eq!(
        row.cost,
        price.cost(TokenUsage {
            input: row.input_tokens,
            cached_input: 0,
            output: 12
        })
    );
}

#[tokio::test]
async fn an_unpriced_model_is_refused_when_money_applies() {
    let h = Harness::with(MockConfig::default(), |c| {
        c.deployments[0].models.push("house-model".into());
    })
    .await;
    let key = h.key("billed", |k| k.account = Some("acme".into())).await;
    let (status, code, retry, _) = error_of(
        h.post_as(&key, "/v1/chat/completions", &chat("house-model", 5))
            .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str(), retry.as_str()),
        (400, "model_not_priced", "false")
    );
    assert_eq!(h.mock.stats().snapshot().received, 0);
}

#[tokio::test]
async fn thresholds_call_the_webhook_once() {
    use axum::routing::post;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let hook = axum::Router::new().route(
        "/hook",
        post(move |body: axum::Json<serde_json::Value>| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body.0);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(common::localhost())
        .await
        .expect("bind");
    let hook_url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, hook).await });

    let h = Harness::with(MockConfig::default(), |c| {
        c.money.webhook_url = Some(hook_url);
    })
    .await;
    let key = h.key("watched", |k| k.account = Some("acme".into())).await;
    h.gw()
        .db
        .add_credits("acme", 2_000, "test", "seed")
        .await
        .expect("credits");
    // As the background refresh may at any moment: the mark set next then
    // arrives without a credit entry of its own, and must still be seen.
    h.gw().money.sync().await.expect("synced");
    h.gw()
        .db
        .set_low_balance("acme", Some(1_000))
        .await
        .expect("mark");
    h.gw()
        .db
        .set_budget(&Budget {
            scope: Arc::from("key:watched"),
            window: Window::Month,
            cap: 100_000,
            alert_percent: Some(1),
        })
        .await
        .expect("budget");
    h.gw().money.sync().await.expect("synced");
    // gpt-4o, 150 output tokens: $0.0015 + input, over 1% of $0.10 and
    // past the low-balance mark in one request.
    let first = h
        .post_as(&key, "/v1/chat/completions", &chat("gpt-4o", 150))
        .await;
    assert_eq!(first.status(), 200);
    // A deadline, not a sleep: a missing alert fails instead of hanging.
    let mut next = async || {
        tokio::time::timeout(std::time::Duration::from_secs(20), rx.recv())
            .await
            .expect("an alert within 20 s")
            .expect("an alert")
    };
    let mut events = [next().await, next().await];
    events.sort_by_key(|e| e["event"].as_str().unwrap_or_default().to_owned());
    assert_eq!(events[0]["event"], "budget_threshold");
    assert_eq!(events[0]["scope"], "key:watched");
    assert_eq!(events[0]["percent"], 1);
    assert_eq!(events[1]["event"], "low_balance");
    assert_eq!(events[1]["account"], "acme");
}
