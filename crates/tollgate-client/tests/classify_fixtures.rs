//! `classify` over real-world answers: OpenAI's, Azure's, Anthropic's and
//! Tollgate's status codes, headers and bodies, as PROVIDERS.md records them.

use http::{HeaderMap, HeaderName, HeaderValue};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tollgate_client::{Disposition, Error, classify};

/// 2026-11-30T23:00:00Z, an hour before a monthly budget resets.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_796_079_600)
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn every_fixture_gets_its_disposition() {
    use Disposition::*;
    // (what it is, status, headers, body, expected)
    type Fixture<'a> = (&'a str, u16, Vec<(&'a str, &'a str)>, &'a str, Disposition);
    let cases: Vec<Fixture<'_>> = vec![
        (
            "OpenAI 429 on requests, with retry-after-ms",
            429,
            vec![("retry-after-ms", "17"), ("retry-after", "1")],
            r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-abc123 on requests per min (RPM): Limit 3500, Used 3500, Requested 1. Please try again in 17ms.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
            RetryAfter(Duration::from_millis(17)),
        ),
        (
            "OpenAI 429 on tokens, no retry headers",
            429,
            vec![],
            r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-abc123 on tokens per min (TPM): Limit 30000, Used 29500, Requested 1200. Please try again in 1.4s.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#,
            Backoff,
        ),
        (
            "OpenAI request too large",
            429,
            vec![],
            r#"{"error":{"message":"Request too large for gpt-4o in organization org-abc123 on tokens per min (TPM): Limit 30000, Requested 52000. The input or output tokens must be reduced in order to run successfully.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#,
            FailFast,
        ),
        (
            "OpenAI insufficient_quota",
            429,
            vec![],
            r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
            TopUp { account: None },
        ),
        (
            "Azure OpenAI 429 with seconds",
            429,
            vec![("retry-after", "6")],
            r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current pricing tier. Please retry after 6 seconds."}}"#,
            RetryAfter(secs(6)),
        ),
        (
            "Anthropic 429",
            429,
            vec![("retry-after", "7")],
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#,
            RetryAfter(secs(7)),
        ),
        (
            "Anthropic 529 overloaded",
            529,
            vec![],
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            Backoff,
        ),
        (
            "Tollgate rolling limit",
            429,
            vec![
                ("retry-after-ms", "1200"),
                ("retry-after", "2"),
                ("x-should-retry", "true"),
            ],
            r#"{"error":{"message":"Rate limit reached for key:prod-web on tokens per min (TPM): limit 30000, used 29500, requested 1200. Please try again in 1.2s.","type":"rate_limit_exceeded","code":"rate_limit_exceeded","param":null,"scope":"key:prod-web","limit":"tokens_per_minute","retry_after_seconds":1.2}}"#,
            RetryAfter(Duration::from_millis(1200)),
        ),
        (
            "Tollgate daily cap",
            429,
            vec![("retry-after", "3600"), ("x-should-retry", "false")],
            r#"{"error":{"message":"Daily token cap reached for key:batch on tokens per day (TPD): limit 1000000, used 999000, requested 2000. It resets at 00:00 UTC, in 1h0m0s.","type":"rate_limit_exceeded","code":"daily_token_cap","param":null,"scope":"key:batch","limit":"tokens_per_day","retry_after_seconds":3600.0}}"#,
            DailyCapUntil(secs(3600)),
        ),
        (
            "Tollgate request larger than the limit",
            429,
            vec![("x-should-retry", "false")],
            r#"{"error":{"message":"Request too large for key:small on tokens per min (TPM): limit 1000, requested 2009.","type":"rate_limit_exceeded","code":"request_too_large","param":null,"scope":"key:small","limit":"tokens_per_minute"}}"#,
            FailFast,
        ),
        (
            "Tollgate budget",
            429,
            vec![("retry-after", "3600"), ("x-should-retry", "false")],
            r#"{"error":{"message":"Budget of team:search exhausted: cap $50.00 per month, spent $50.01.","type":"budget_exceeded","code":"budget_exceeded","param":null,"scope":"team:search"}}"#,
            StopBudget {
                scope: Some("team:search".into()),
                resets_in: Some(secs(3600)),
            },
        ),
        (
            "Tollgate lifetime budget",
            429,
            vec![("x-should-retry", "false")],
            r#"{"error":{"message":"Budget exhausted.","type":"budget_exceeded","code":"budget_exceeded","param":null,"scope":"key:trial"}}"#,
            StopBudget {
                scope: Some("key:trial".into()),
                resets_in: None,
            },
        ),
        (
            "Tollgate insufficient credits",
            402,
            vec![("x-should-retry", "false")],
            r#"{"error":{"message":"Account acme has $0.42, this request needs up to $0.61.","type":"insufficient_credits","code":"insufficient_credits","param":null,"account":"acme"}}"#,
            TopUp {
                account: Some("acme".into()),
            },
        ),
        (
            "Tollgate upstream failure",
            502,
            vec![("x-should-retry", "true")],
            r#"{"error":{"message":"The upstream deployment 'openai-1' answered 503.","type":"upstream_error","code":"upstream_status","param":null}}"#,
            Backoff,
        ),
        (
            "OpenAI 500",
            500,
            vec![],
            r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
            Backoff,
        ),
        (
            "503 with an HTTP date",
            503,
            vec![("retry-after", "Mon, 30 Nov 2026 23:00:30 GMT")],
            "Service Unavailable",
            RetryAfter(secs(30)),
        ),
        (
            "400 context length",
            400,
            vec![],
            r#"{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
            FailFast,
        ),
        (
            "401 invalid key",
            401,
            vec![],
            r#"{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
            FailFast,
        ),
        (
            "403 model not allowed",
            403,
            vec![("x-should-retry", "false")],
            r#"{"error":{"message":"The API key 'narrow' is not allowed to use the model `gpt-4o`.","type":"permission_error","param":"model","code":"model_not_allowed"}}"#,
            FailFast,
        ),
        (
            "422 unprocessable",
            422,
            vec![],
            r#"{"error":{"message":"Unprocessable.","type":"invalid_request_error","param":null,"code":null}}"#,
            FailFast,
        ),
        ("200", 200, vec![], r#"{"id":"chatcmpl-1"}"#, Done),
    ];
    for (name, status, hs, body, expected) in cases {
        let got = classify(status, &headers(&hs), body.as_bytes(), now());
        assert_eq!(got, expected, "{name}");
    }
}

#[test]
fn final_dispositions_become_errors_that_say_what_to_do() {
    let budget = Disposition::StopBudget {
        scope: Some("team:search".into()),
        resets_in: Some(secs(3600)),
    };
    let e = Error::from_disposition(&budget, 429, b"{}", now()).expect("an error");
    assert_eq!(
        e.to_string(),
        "budget for team:search exhausted until 2026-12-01T00:00:00Z — raise the cap or wait"
    );
    let top_up = Disposition::TopUp {
        account: Some("acme".into()),
    };
    let e = Error::from_disposition(&top_up, 402, b"{}", now()).expect("an error");
    assert!(e.to_string().contains("top up the account"), "{e}");
    let body = br#"{"error":{"message":"This model's maximum context length is 128000 tokens.","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
    let e = Error::from_disposition(&Disposition::FailFast, 400, body, now()).expect("an error");
    assert!(
        e.to_string()
            .starts_with("HTTP 400 context_length_exceeded"),
        "{e}"
    );
    assert!(Error::from_disposition(&Disposition::Backoff, 503, b"", now()).is_none());
}
