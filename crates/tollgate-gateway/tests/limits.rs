//! Limits over real HTTP with the mock upstream: exact admission under a
//! concurrent burst, honest retry advice, token limits charged on estimates
//! and corrected by usage, per-user isolation, team limits, daily caps and
//! queueing. Tests that assert exact amounts drive a fake clock.

mod common;

use common::{Harness, error_of, parse_sse};
use std::time::Duration;
use tollgate_core::clock::FakeClock;
use tollgate_core::limits::calendar::DAY_NS;
use tollgate_core::limits::{KeyLimits, LimitSet};
use tollgate_gateway::config::TeamConfig;
use tollgate_mock::MockConfig;

const CHAT: &str = "/v1/chat/completions";
/// 9 prompt tokens in o200k: 3 priming + 3 for the message + "user" + "hello world".
const HELLO: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}]"#;

fn chat(extra: &str) -> String {
    format!("{HELLO}{extra}}}")
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn num(resp: &reqwest::Response, name: &str) -> u64 {
    header(resp, name)
        .parse()
        .unwrap_or_else(|_| panic!("{name} is a number"))
}

/// A fake clock at noon UTC of some day.
fn noon() -> FakeClock {
    FakeClock::new(20_000 * DAY_NS + DAY_NS / 2)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_concurrent_burst_gets_exactly_the_rpm_and_honest_429s() {
    let h = Harness::start().await;
    let key = h
        .key("burst", |k| {
            k.limits = KeyLimits {
                rpm: Some(60),
                ..KeyLimits::default()
            }
        })
        .await;
    let body = chat(r#","max_tokens":1"#);
    let sends = (0..200).map(|_| h.post_as(&key, CHAT, &body));
    let responses = futures_util::future::join_all(sends).await;
    let mut admitted = 0;
    for r in responses {
        match r.status().as_u16() {
            200 => admitted += 1,
            429 => {
                assert_eq!(header(&r, "x-ratelimit-limit-requests"), "60");
                assert_eq!(header(&r, "x-should-retry"), "true");
                let ms = num(&r, "retry-after-ms");
                assert!((1..=1_000).contains(&ms), "retry-after-ms {ms}");
                assert_eq!(num(&r, "retry-after"), ms.div_ceil(1000));
                let (_, code, _, body) = error_of(r).await;
                assert_eq!(code, "rate_limit_exceeded");
                assert_eq!(body["error"]["type"], "rate_limit_exceeded");
                assert_eq!(body["error"]["scope"], "key:burst");
                assert_eq!(body["error"]["limit"], "requests_per_minute");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    // One more may refill (1/s) while the burst is in flight.
    assert!((60..=61).contains(&admitted), "admitted {admitted}");
    assert_eq!(
        h.mock.stats().snapshot().received,
        admitted,
        "refused requests never reach the provider"
    );
}

#[tokio::test]
async fn retry_after_is_exactly_when_the_request_fits() {
    let clock = noon();
    let h = Harness::with_clock(MockConfig::default(), |_| {}, clock.clone()).await;
    let key = h
        .key("honest", |k| {
            k.limits = KeyLimits {
                rpm: Some(60),
                ..KeyLimits::default()
            }
        })
        .await;
    let body = chat(r#","max_tokens":1"#);
    for i in 0..60u64 {
        let r = h.post_as(&key, CHAT, &body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 59 - i);
    }
    let r = h.post_as(&key, CHAT, &body).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after-ms"), "1000");
    assert_eq!(header(&r, "retry-after"), "1");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    let (_, _, _, err) = error_of(r).await;
    assert_eq!(err["error"]["retry_after_seconds"], 1.0);
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Please try again in 1s")),
        "{err}"
    );

    // 10% early: still refused, and told the rest of the wait.
    clock.advance(Duration::from_millis(900));
    let r = h.post_as(&key, CHAT, &body).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after-ms"), "100");
    // On time: admitted.
    clock.advance(Duration::from_millis(100));
    let r = h.post_as(&key, CHAT, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
}

#[tokio::test]
async fn token_limits_charge_the_estimate_and_settle_on_real_usage() {
    let clock = noon();
    let h = Harness::with_clock(
        MockConfig::default(),
        |c| c.limits.default_output_tokens = 500,
        clock.clone(),
    )
    .await;
    let key = h
        .key("tokens", |k| {
            k.limits = KeyLimits {
                tpm: Some(1_000),
                ..KeyLimits::default()
            }
        })
        .await;
    // No max_tokens: 9 prompt + 500 assumed output are charged up front...
    let r = h.post_as(&key, CHAT, &chat("")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "1000");
    assert_eq!(num(&r, "x-ratelimit-remaining-tokens"), 1_000 - 509);
    let usage: serde_json::Value = r.json().await.expect("json");
    let used = usage["usage"]["total_tokens"].as_u64().expect("usage");
    assert_eq!(used, 9 + 16, "the mock's default reply is 16 tokens");
    // ...and replaced by the real 25 once the answer is in.
    let r = h.post_as(&key, CHAT, &chat("")).await;
    assert_eq!(num(&r, "x-ratelimit-remaining-tokens"), 1_000 - 25 - 509);

    // A stream the client asked no usage of: the gateway asks upstream,
    // settles on it, and strips the chunk again.
    let r = h
        .post_as(&key, CHAT, &chat(r#","max_tokens":7,"stream":true"#))
        .await;
    assert_eq!(num(&r, "x-ratelimit-remaining-tokens"), 1_000 - 50 - 16);
    let (text, usage, done, _) = parse_sse(&r.text().await.expect("body"));
    assert!(
        done && usage.is_none(),
        "no usage chunk for a client that did not ask"
    );
    assert_eq!(text.split(' ').count(), 7);
    let r = h
        .post_as(
            &key,
            CHAT,
            &chat(r#","max_tokens":3,"stream":true,"stream_options":{"include_usage":true}"#),
        )
        .await;
    assert_eq!(num(&r, "x-ratelimit-remaining-tokens"), 1_000 - 66 - 12);
    let (_, usage, _, _) = parse_sse(&r.text().await.expect("body"));
    assert_eq!(usage.map(|u| u["total_tokens"].clone()), Some(12.into()));

    // More than remains: a wait; more than the whole limit: never.
    let r = h.post_as(&key, CHAT, &chat(r#","max_tokens":950"#)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-should-retry"), "true");
    let (_, _, _, err) = error_of(r).await;
    assert_eq!(err["error"]["limit"], "tokens_per_minute");
    let r = h.post_as(&key, CHAT, &chat(r#","max_tokens":2000"#)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-should-retry"), "false");
    assert!(r.headers().get("retry-after").is_none());
    let (_, code, _, err) = error_of(r).await;
    assert_eq!(code, "request_too_large");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("never fit"))
    );
}

#[tokio::test]
async fn a_stream_the_client_abandons_is_settled_on_what_was_delivered() {
    let clock = noon();
    let mock = MockConfig {
        tokens_per_second: Some(50),
        ..MockConfig::default()
    };
    let h = Harness::with_clock(mock, |_| {}, clock.clone()).await;
    let key = h
        .key("abandon", |k| {
            k.limits = KeyLimits {
                tpm: Some(10_000),
                ..KeyLimits::default()
            }
        })
        .await;
    let mut r = h
        .post_as(&key, CHAT, &chat(r#","max_tokens":1000,"stream":true"#))
        .await;
    assert_eq!(num(&r, "x-ratelimit-remaining-tokens"), 10_000 - 1_009);
    // Read a few events, then hang up.
    let mut seen = String::new();
    while seen.matches("data: ").count() < 4 {
        let chunk = r.chunk().await.expect("read").expect("more");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(r);
    let stats = h
        .mock
        .stats()
        .wait_until(Duration::from_secs(10), |s| s.cancelled >= 1)
        .await;
    assert!(stats.cancelled >= 1, "the mock saw the hang-up: {stats:?}");
    // The next request sees the abandoned one charged far below 1009:
    // its prompt plus the handful of tokens that were produced.
    let r = h.post_as(&key, CHAT, &chat(r#","max_tokens":1"#)).await;
    let remaining = num(&r, "x-ratelimit-remaining-tokens");
    let charged = 10_000 - 10 - remaining;
    assert!(
        (9 + 3..9 + 200).contains(&charged),
        "abandoned stream charged {charged}"
    );
}

#[tokio::test]
async fn end_users_of_one_key_are_limited_apart() {
    let clock = noon();
    let h = Harness::with_clock(MockConfig::default(), |_| {}, clock).await;
    let key = h
        .key("shared", |k| {
            k.limits.users = Some(LimitSet {
                rpm: Some(2),
                ..LimitSet::default()
            })
        })
        .await;
    let as_user = |u: &str| chat(&format!(r#","max_tokens":1,"user":"{u}""#));
    for _ in 0..2 {
        assert_eq!(h.post_as(&key, CHAT, &as_user("alice")).await.status(), 200);
    }
    let r = h.post_as(&key, CHAT, &as_user("alice")).await;
    let (status, _, _, err) = error_of(r).await;
    assert_eq!(status, 429);
    assert_eq!(err["error"]["scope"], "key:shared/user:alice");
    assert_eq!(h.post_as(&key, CHAT, &as_user("bob")).await.status(), 200);
    // The header names the user too, and wins over the body.
    let r = h
        .http
        .post(h.url(CHAT))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .header("x-tollgate-user", "carol")
        .body(as_user("alice"))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_team_limit_is_shared_by_its_keys_and_a_refusal_charges_nothing() {
    let clock = noon();
    let h = Harness::with_clock(
        MockConfig::default(),
        |c| {
            c.teams.insert(
                "search".into(),
                TeamConfig {
                    rpm: Some(3),
                    ..TeamConfig::default()
                },
            );
        },
        clock.clone(),
    )
    .await;
    let a = h
        .key("a", |k| {
            k.team = Some("search".into());
            k.limits.rpm = Some(4);
        })
        .await;
    let b = h.key("b", |k| k.team = Some("search".into())).await;
    let body = chat(r#","max_tokens":1"#);
    assert_eq!(h.post_as(&a, CHAT, &body).await.status(), 200);
    assert_eq!(h.post_as(&a, CHAT, &body).await.status(), 200);
    assert_eq!(h.post_as(&b, CHAT, &body).await.status(), 200);
    for _ in 0..4 {
        let r = h.post_as(&a, CHAT, &body).await;
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
        let (status, _, _, err) = error_of(r).await;
        assert_eq!(status, 429);
        assert_eq!(err["error"]["scope"], "team:search");
        assert!(
            err["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("limit 3, used 3, requested 1")),
            "{err}"
        );
    }
    // 20 s later the team has one slot again. Had the four refusals been
    // charged to key a's own 4 per minute, it would now be out as well.
    clock.advance(Duration::from_secs(20));
    assert_eq!(h.post_as(&a, CHAT, &body).await.status(), 200);
}

#[tokio::test]
async fn a_daily_cap_waits_for_utc_midnight() {
    let clock = FakeClock::new(20_000 * DAY_NS + DAY_NS - 30 * 1_000_000_000);
    let h = Harness::with_clock(MockConfig::default(), |_| {}, clock.clone()).await;
    let key = h
        .key("daily", |k| {
            k.limits = KeyLimits {
                tpd: Some(100),
                ..KeyLimits::default()
            }
        })
        .await;
    let body = chat(r#","max_tokens":40"#);
    assert_eq!(h.post_as(&key, CHAT, &body).await.status(), 200);
    assert_eq!(h.post_as(&key, CHAT, &body).await.status(), 200);
    let r = h.post_as(&key, CHAT, &body).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), "30", "seconds to 00:00 UTC");
    assert_eq!(header(&r, "x-should-retry"), "false");
    let (_, code, _, err) = error_of(r).await;
    assert_eq!(code, "daily_token_cap");
    assert_eq!(err["error"]["type"], "rate_limit_exceeded");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Daily token cap reached"))
    );
    clock.advance(Duration::from_secs(30));
    assert_eq!(h.post_as(&key, CHAT, &body).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_may_wait_queues_until_it_fits_without_delaying_other_keys() {
    let h = Harness::start().await;
    let waiting = h
        .key("patient", |k| {
            k.limits = KeyLimits {
                rpm: Some(60),
                ..KeyLimits::default()
            }
        })
        .await;
    let other = h.key("other", |_| {}).await;
    let body = chat(r#","max_tokens":1"#);
    let burst = (0..60).map(|_| h.post_as(&waiting, CHAT, &body));
    futures_util::future::join_all(burst).await;
    // Without leave to wait: refused at once. Use up any slot that refilled
    // meanwhile until the refusal leaves at least half a slot (500 ms) to
    // wait, so the queued request below surely has to wait.
    for round in 0.. {
        assert!(round < 20, "the key never filled up");
        let r = h.post_as(&waiting, CHAT, &body).await;
        if r.status() == 429 {
            let wait = num(&r, "retry-after-ms");
            if wait >= 500 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
    // With it: queued until the next slot refills, then served.
    let queued = {
        let req = h
            .http
            .post(h.url(CHAT))
            .bearer_auth(&waiting)
            .header("content-type", "application/json")
            .header("x-tollgate-max-wait", "5s")
            .body(body.clone());
        tokio::spawn(async move { req.send().await.expect("sent") })
    };
    // Another key is served meanwhile, while the queued request still waits.
    let r = h.post_as(&other, CHAT, &body).await;
    assert_eq!(r.status(), 200);
    assert!(!queued.is_finished(), "the queued request is still waiting");
    let r = queued.await.expect("joined");
    assert_eq!(r.status(), 200);
    // A wait longer than the request allows is refused at once, honestly.
    let r = h
        .http
        .post(h.url(CHAT))
        .bearer_auth(&waiting)
        .header("content-type", "application/json")
        .header("x-tollgate-max-wait", "1ms")
        .body(body.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 429);
    let r = h
        .http
        .post(h.url(CHAT))
        .bearer_auth(&waiting)
        .header("content-type", "application/json")
        .header("x-tollgate-max-wait", "soon")
        .body(body)
        .send()
        .await
        .expect("sent");
    let (status, code, _, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (400, "invalid_header"));
}

#[tokio::test]
async fn limit_edits_through_the_admin_api_apply_at_once() {
    let clock = noon();
    let h = Harness::with_clock(
        MockConfig::default(),
        |c| {
            c.presets.insert(
                "dev".into(),
                KeyLimits {
                    rpm: Some(1),
                    ..KeyLimits::default()
                },
            );
        },
        clock,
    )
    .await;
    let admin = |req: reqwest::RequestBuilder| req.bearer_auth(common::ADMIN_KEY);
    let created: serde_json::Value = admin(h.http.post(h.url("/admin/keys")))
        .json(&serde_json::json!({"name": "edited", "preset": "dev"}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let secret = created["secret"].as_str().expect("secret").to_owned();
    let id = created["key"]["id"].as_str().expect("id").to_owned();
    let body = chat(r#","max_tokens":1"#);
    assert_eq!(h.post_as(&secret, CHAT, &body).await.status(), 200);
    assert_eq!(h.post_as(&secret, CHAT, &body).await.status(), 429);
    // The key's own rpm overrides its preset's.
    let r = admin(h.http.patch(h.url(&format!("/admin/keys/{id}"))))
        .json(&serde_json::json!({"limits": {"rpm": 5}}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let r = h.post_as(&secret, CHAT, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "5");
    // An unknown preset is refused with a reason.
    let r = admin(h.http.patch(h.url(&format!("/admin/keys/{id}"))))
        .json(&serde_json::json!({"preset": "nope"}))
        .send()
        .await
        .expect("sent");
    let (status, _, _, err) = error_of(r).await;
    assert_eq!(status, 400);
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no preset named `nope`"))
    );
}
