//! The admin API manages keys behind the admin key, and the gateway obeys
//! its changes at once.

mod common;

use common::{ADMIN_KEY, Harness, error_of};
use serde_json::{Value, json};

const CHAT: &str =
    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;

async fn admin(
    h: &Harness,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    key: &str,
) -> reqwest::Response {
    let mut req = h.http.request(method, h.url(path)).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.expect("sent")
}

async fn chat_with(h: &Harness, key: &str) -> u16 {
    h.http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await
        .expect("sent")
        .status()
        .as_u16()
}

#[tokio::test]
async fn keys_are_created_listed_rotated_and_revoked() {
    let h = Harness::start().await;
    let post = reqwest::Method::POST;
    let created = admin(
        &h,
        post.clone(),
        "/admin/keys",
        Some(json!({"name": "web", "models": ["gpt-4o"], "expires_in": "30d"})),
        ADMIN_KEY,
    )
    .await;
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.expect("json");
    let secret = created["secret"]
        .as_str()
        .expect("secret shown once")
        .to_owned();
    assert!(secret.starts_with("tg-") && secret.len() == 67);
    assert_eq!(chat_with(&h, &secret).await, 200);

    let list: Value = admin(&h, reqwest::Method::GET, "/admin/keys", None, ADMIN_KEY)
        .await
        .json()
        .await
        .expect("json");
    let text = list.to_string();
    assert!(!text.contains(&secret[3..]), "list never shows secrets");
    assert!(!text.contains("secret_hash"));
    assert_eq!(list["data"].as_array().map(Vec::len), Some(2));

    let rotated: Value = admin(&h, post.clone(), "/admin/keys/web/rotate", None, ADMIN_KEY)
        .await
        .json()
        .await
        .expect("json");
    let new_secret = rotated["secret"].as_str().expect("new secret").to_owned();
    assert_eq!(
        chat_with(&h, &secret).await,
        401,
        "the old secret stops working at once"
    );
    assert_eq!(chat_with(&h, &new_secret).await, 200);

    assert_eq!(
        admin(&h, post.clone(), "/admin/keys/web/revoke", None, ADMIN_KEY)
            .await
            .status(),
        200
    );
    assert_eq!(chat_with(&h, &new_secret).await, 401);

    let (s, c, _, _) =
        error_of(admin(&h, post, "/admin/keys/nobody/revoke", None, ADMIN_KEY).await).await;
    assert_eq!((s, c.as_str()), (404, "not_found"));
}

#[tokio::test]
async fn admin_api_refuses_wrong_keys_and_bad_input() {
    let h = Harness::start().await;
    let (s, c, _, _) =
        error_of(admin(&h, reqwest::Method::GET, "/admin/keys", None, "wrong").await).await;
    assert_eq!((s, c.as_str()), (401, "invalid_admin_key"));
    // A client key is not an admin key.
    let (s, _, _, _) = error_of(
        admin(
            &h,
            reqwest::Method::GET,
            "/admin/keys",
            None,
            &h.key.clone(),
        )
        .await,
    )
    .await;
    assert_eq!(s, 401);
    let (s, _, _, _) = error_of(
        admin(
            &h,
            reqwest::Method::POST,
            "/admin/keys",
            Some(json!({"nam": "x"})),
            ADMIN_KEY,
        )
        .await,
    )
    .await;
    assert_eq!(s, 400);
    let (s, c, _, _) = error_of(
        admin(
            &h,
            reqwest::Method::POST,
            "/admin/keys",
            Some(json!({"name": "test"})),
            ADMIN_KEY,
        )
        .await,
    )
    .await;
    assert_eq!(
        (s, c.as_str()),
        (409, "conflict"),
        "a live key already has that name"
    );
}

#[tokio::test]
async fn a_key_revoked_in_the_database_by_another_process_is_refused_within_the_refresh() {
    let h = Harness::start().await;
    assert_eq!(chat_with(&h, &h.key).await, 200);
    // What `tollgate keys revoke` does: write the database, not the gateway.
    h.gw().db.revoke_key("test").await.expect("revoked");
    assert!(
        h.gw().keys.refresh_if_changed().await.expect("refresh"),
        "the change is seen"
    );
    assert_eq!(chat_with(&h, &h.key).await, 401);
}
