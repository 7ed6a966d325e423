//! Every bad input and every upstream failure gets its exact OpenAI-shaped
//! answer (DESIGN §1): status, `error.type`, `error.code`, `x-should-retry`.

mod common;

use common::{Harness, PROVIDER_KEY, error_of, parse_sse};
use tollgate_mock::MockConfig;

const CHAT: &str =
    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;

async fn send(h: &Harness, content_type: Option<&str>, body: Vec<u8>) -> reqwest::Response {
    let mut req = h
        .http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(&h.key)
        .body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    req.send().await.expect("sent")
}

#[tokio::test]
async fn bad_bodies_get_exact_caller_errors() {
    let h = Harness::with(MockConfig::default(), |c| c.server.max_body_bytes = 4096).await;
    let json = Some("application/json");
    // (case, content type, body, status, code)
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "malformed JSON",
            json,
            b"{\"model\": \"gpt-4o\", ".to_vec(),
            400,
            "invalid_json",
        ),
        (
            "not an object",
            json,
            b"[1,2]".to_vec(),
            400,
            "invalid_json",
        ),
        (
            // serde alone would read this array as a request, field by field.
            "an array shaped like a request",
            json,
            br#"["gpt-4o", [{"role": "user", "content": "hi"}]]"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "wrong field type",
            json,
            br#"{"model": 5, "messages": []}"#.to_vec(),
            400,
            "invalid_value",
        ),
        (
            "missing messages",
            json,
            br#"{"model": "gpt-4o"}"#.to_vec(),
            400,
            "missing_required_parameter",
        ),
        (
            "missing model",
            json,
            br#"{"messages": []}"#.to_vec(),
            400,
            "missing_required_parameter",
        ),
        (
            "unknown model",
            json,
            br#"{"model": "gpt-9", "messages": []}"#.to_vec(),
            404,
            "model_not_found",
        ),
        (
            "oversized",
            json,
            format!(
                r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{}"}}]}}"#,
                "x".repeat(5000)
            )
            .into_bytes(),
            413,
            "request_too_large",
        ),
        (
            "not UTF-8",
            json,
            b"{\"model\": \"gpt-4o\xff\xfe\", \"messages\": []}".to_vec(),
            400,
            "invalid_encoding",
        ),
        (
            "wrong content type",
            Some("text/plain"),
            CHAT.as_bytes().to_vec(),
            415,
            "unsupported_media_type",
        ),
    ];
    for (name, ct, body, status, code) in cases {
        let (s, c, retry, body) = error_of(send(&h, ct, body).await).await;
        assert_eq!((s, c.as_str()), (status, code), "{name}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{name}");
        assert_eq!(retry, "false", "{name}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }
    assert_eq!(
        h.mock.stats().snapshot().received,
        0,
        "no bad request reached the provider"
    );
}

#[tokio::test]
async fn a_body_without_content_type_is_read_as_json() {
    let h = Harness::start().await;
    assert_eq!(send(&h, None, CHAT.as_bytes().to_vec()).await.status(), 200);
}

#[tokio::test]
async fn unknown_routes_and_methods_are_openai_shaped() {
    let h = Harness::start().await;
    let (s, c, _, _) = error_of(h.http.post(h.url("/v1/nope")).send().await.expect("sent")).await;
    assert_eq!((s, c.as_str()), (404, "unknown_url"));
    let (s, c, _, _) = error_of(
        h.http
            .get(h.url("/v1/chat/completions"))
            .send()
            .await
            .expect("sent"),
    )
    .await;
    assert_eq!((s, c.as_str()), (405, "method_not_allowed"));
}

#[tokio::test]
async fn credential_problems_are_401_and_403() {
    let h = Harness::start().await;
    let gw = h.gw();
    let (_, revoked) = gw
        .db
        .create_key(tollgate_store::NewKey {
            name: "old".into(),
            ..Default::default()
        })
        .await
        .expect("key");
    gw.db.revoke_key("old").await.expect("revoked");
    let (_, expired) = gw
        .db
        .create_key(tollgate_store::NewKey {
            name: "short".into(),
            expires_at: Some(1),
            ..Default::default()
        })
        .await
        .expect("key");
    let (_, narrow) = gw
        .db
        .create_key(tollgate_store::NewKey {
            name: "narrow".into(),
            models: Some(vec!["gpt-4o-mini".into()]),
            ..Default::default()
        })
        .await
        .expect("key");
    gw.keys.reload().await.expect("reload");
    let call = |key: Option<String>| {
        let mut req = h
            .http
            .post(h.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(CHAT);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send()
    };
    for (name, key, status, kind, code) in [
        (
            "no key",
            None,
            401,
            "authentication_error",
            "invalid_api_key",
        ),
        (
            "unknown key",
            Some(format!("tg-{}", "0".repeat(64))),
            401,
            "authentication_error",
            "invalid_api_key",
        ),
        (
            "revoked",
            Some(revoked.expose().to_owned()),
            401,
            "authentication_error",
            "key_revoked",
        ),
        (
            "expired",
            Some(expired.expose().to_owned()),
            401,
            "authentication_error",
            "key_expired",
        ),
        (
            "model not allowed",
            Some(narrow.expose().to_owned()),
            403,
            "permission_error",
            "model_not_allowed",
        ),
    ] {
        let (s, c, retry, body) = error_of(call(key).await.expect("sent")).await;
        assert_eq!((s, c.as_str()), (status, code), "{name}: {body}");
        assert_eq!(body["error"]["type"], kind, "{name}");
        assert_eq!(retry, "false", "{name}");
    }
}

#[tokio::test]
async fn upstream_failures_are_upstream_errors_that_may_be_retried() {
    // One call per request and no circuit: this checks how each failure is
    // worded, not how the gateway routes around it (tests/routing.rs).
    let h = Harness::with(MockConfig::default(), |c| {
        c.routing.max_attempts = 1;
        c.routing.circuit_failures = 0;
    })
    .await;
    for (fault, status, code) in [
        ("503", 503, "server_error"),
        ("500", 502, "server_error"),
        ("overload", 503, "overloaded_error"),
        ("reset", 502, "upstream_unreachable"),
        ("truncated", 502, "upstream_invalid_response"),
        ("malformed", 502, "upstream_invalid_response"),
    ] {
        let resp = h
            .http
            .post(h.url("/v1/chat/completions"))
            .bearer_auth(&h.key)
            .header("content-type", "application/json")
            .header("x-mock-fault", fault)
            .body(CHAT)
            .send()
            .await
            .expect("sent");
        let (s, c, retry, body) = error_of(resp).await;
        assert_eq!((s, c.as_str()), (status, code), "{fault}: {body}");
        assert_eq!(body["error"]["type"], "upstream_error", "{fault}");
        assert_eq!(retry, "true", "{fault}");
        assert!(
            !body.to_string().contains("127.0.0.1"),
            "{fault}: upstream address leaked: {body}"
        );
    }
}

#[tokio::test]
async fn an_upstream_answer_that_is_not_utf8_is_an_invalid_response() {
    // JSON in shape, with bytes in a string that are not UTF-8: the answer
    // must not reach the client as if it were an answer.
    let upstream = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async {
            let mut body = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"#.to_vec();
            body.extend_from_slice(b"\"caf\xe9 \xff\"}");
            body.extend_from_slice(br#","finish_reason":"stop"}],"usage":{"prompt_tokens":8,"completion_tokens":2,"total_tokens":10}}"#);
            ([("content-type", "application/json")], body)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, upstream).await });
    let h = Harness::with(MockConfig::default(), |c| {
        c.routing.max_attempts = 1;
        c.deployments[0].base_url = Some(format!("http://{addr}/v1"));
    })
    .await;
    let (s, c, retry, body) = error_of(h.post("/v1/chat/completions", CHAT).await).await;
    assert_eq!(
        (s, c.as_str(), retry.as_str()),
        (502, "upstream_invalid_response", "true"),
        "{body}"
    );
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    // A port that was free a moment ago: nothing listens there.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let h = Harness::with(MockConfig::default(), |c| {
        c.deployments[0].base_url = Some(format!("http://{free}/v1"));
    })
    .await;
    let (s, c, retry, _) = error_of(h.post("/v1/chat/completions", CHAT).await).await;
    assert_eq!(
        (s, c.as_str(), retry.as_str()),
        (502, "upstream_unreachable", "true")
    );
}

#[tokio::test]
async fn a_tls_handshake_that_never_finishes_is_cut_at_the_connect_timeout() {
    // A listener that takes connections and never says a word: TCP
    // connects at once, the TLS handshake waits forever.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let h = Harness::with(MockConfig::default(), |c| {
        c.routing.max_attempts = 1;
        c.routing.circuit_failures = 0;
        let d = &mut c.deployments[0];
        d.base_url = Some(format!("https://{addr}/v1"));
        d.connect_timeout = std::time::Duration::from_millis(200);
        d.timeout = std::time::Duration::from_secs(600);
    })
    .await;
    // Only the connect timeout can end this before the call's 600 s: the
    // bound here guards against a hang, it measures nothing.
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        h.post("/v1/chat/completions", CHAT),
    )
    .await
    .expect("answered long before the call's own timeout");
    let (s, c, retry, _) = error_of(resp).await;
    assert_eq!(
        (s, c.as_str(), retry.as_str()),
        (504, "upstream_timeout", "true")
    );
}

#[tokio::test]
async fn provider_rate_limits_pass_through_with_their_retry_advice() {
    let h = Harness::with(
        MockConfig {
            rpm: Some(1),
            ..MockConfig::default()
        },
        |_| {},
    )
    .await;
    // Another client of the same provider key spends its one request a
    // minute: the gateway cannot know, so the provider's own 429 answers.
    let direct = h
        .http
        .post(format!("{}/chat/completions", h.mock.base_url()))
        .bearer_auth(PROVIDER_KEY)
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await
        .expect("the mock answers");
    assert_eq!(direct.status(), 200);
    let resp = h.post("/v1/chat/completions", CHAT).await;
    assert!(resp.headers().contains_key("retry-after"));
    let (s, c, retry, body) = error_of(resp).await;
    assert_eq!(
        (s, c.as_str(), retry.as_str()),
        (429, "rate_limit_exceeded", "true")
    );
    assert_eq!(body["error"]["type"], "requests");

    let h = Harness::with(
        MockConfig {
            insufficient_quota: true,
            ..MockConfig::default()
        },
        |_| {},
    )
    .await;
    let (s, c, retry, _) = error_of(h.post("/v1/chat/completions", CHAT).await).await;
    assert_eq!(
        (s, c.as_str(), retry.as_str()),
        (429, "insufficient_quota", "false"),
        "quota never clears with time"
    );
}

#[tokio::test]
async fn provider_caller_errors_pass_through_unchanged() {
    // The gateway knows the model, the provider does not: its 404 is relayed as is.
    let mock = MockConfig {
        models: vec!["gpt-4o".into()],
        ..MockConfig::default()
    };
    let h = Harness::with(mock, |_| {}).await;
    let (s, c, retry, body) = error_of(
        h.post(
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
        )
        .await,
    )
    .await;
    assert_eq!(
        (s, c.as_str(), retry.as_str()),
        (404, "model_not_found", "false")
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("does not exist")
    );
}

#[tokio::test]
async fn a_stream_cut_by_the_upstream_ends_with_an_error_event() {
    let h = Harness::start().await;
    let resp = h
        .http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(&h.key)
        .header("content-type", "application/json")
        .header("x-mock-fault", "cut:3")
        .body(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":10,"stream":true}"#)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let (content, _, done, events) = parse_sse(
        &resp
            .text()
            .await
            .expect("the gateway ends the stream cleanly"),
    );
    assert!(!done);
    assert_eq!(
        content, "the quick brown",
        "the three chunks before the cut arrive"
    );
    let last = events.last().expect("events");
    assert_eq!(last["error"]["code"], "upstream_stream_interrupted");
    // Settled, durably before the error event left, on what was delivered:
    // the prompt and the three one-token chunks, not the 10 asked for.
    let rows = h.gw().db.journaled_rows().expect("journal");
    let [row] = rows.as_slice() else {
        panic!("one usage row: {rows:?}")
    };
    assert_eq!(
        (row.output_tokens, row.status, row.streamed),
        (3, 502, true)
    );
    assert!(row.input_tokens > 0 && row.cost > 0, "{row:?}");
}

/// Sends `request` on a raw connection and reads until the gateway closes
/// it (failing if it does not within ten seconds).
async fn raw_exchange(h: &Harness, request: &[u8]) -> String {
    raw_exchange_paced(h, &[request], std::time::Duration::ZERO).await
}

/// [`raw_exchange`], sending the request in `pieces` with `pause` between
/// them: a slow client.
async fn raw_exchange_paced(h: &Harness, pieces: &[&[u8]], pause: std::time::Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = h.url("").trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    for (i, piece) in pieces.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        // The gateway may answer and close before the client is done: what
        // it answered is read below.
        if conn.write_all(piece).await.is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    // A reset after the answer still leaves the answer in `answer`.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut answer),
    )
    .await
    .expect("the gateway closed the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn clients_that_stall_are_answered_or_cut_after_the_read_timeout() {
    let h = Harness::with(MockConfig::default(), |c| {
        c.server.read_timeout = std::time::Duration::from_millis(300)
    })
    .await;

    // Headers that never end: the connection is closed.
    let answer = raw_exchange(&h, b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n").await;
    assert!(
        !answer.contains("200 OK"),
        "no request was served: {answer}"
    );

    // A body that stops short of its length: 408, OpenAI-shaped, worth a retry.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        h.key,
        CHAT.len()
    );
    let mut request = head.clone().into_bytes();
    request.extend_from_slice(&CHAT.as_bytes()[..20]);
    let answer = raw_exchange(&h, &request).await;
    let (status_line, rest) = answer.split_once("\r\n").expect("a response");
    assert_eq!(status_line, "HTTP/1.1 408 Request Timeout");
    let lower = rest.to_ascii_lowercase();
    assert!(lower.contains("x-should-retry: true"), "{rest}");
    let body = rest
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let error: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    assert_eq!(error["error"]["code"], "request_timeout");
    assert_eq!(error["error"]["type"], "invalid_request_error");

    // A slow body that keeps coming is read to its end, however long it
    // takes in all: the timeout is for a pause.
    let mut pieces: Vec<&[u8]> = vec![head.as_bytes()];
    pieces.extend(CHAT.as_bytes().chunks(CHAT.len() / 4 + 1));
    let answer = raw_exchange_paced(&h, &pieces, std::time::Duration::from_millis(150)).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");

    // A kept-alive connection left idle after its answer is closed.
    let request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    let answer = raw_exchange(&h, request).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}
