//! The admin REST API under `/admin`, guarded by the admin key: virtual keys
//! (create, list, revoke, rotate). A secret is in the response once, at
//! creation or rotation; only its hash is stored.

use crate::Gateway;
use crate::auth::bearer;
use crate::error::Error;
use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tollgate_store::{KeyRecord, NewKey, SecretHash, SecretKey};

fn check_admin(gw: &Gateway, headers: &HeaderMap) -> Result<(), Error> {
    let expected = gw.admin_key.as_ref().ok_or(Error::AdminDisabled)?;
    let presented = bearer(headers).ok_or(Error::AdminUnauthorized)?;
    if SecretHash::of(presented).ct_eq(expected) {
        Ok(())
    } else {
        Err(Error::AdminUnauthorized)
    }
}

/// Body of `POST /admin/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    #[serde(default)]
    models: Option<Vec<String>>,
    /// `30d`, `12h`, …
    #[serde(default)]
    expires_in: Option<String>,
}

/// Parses a lifetime like `30d` into the unix second it ends at.
pub fn expiry_from_now(expires_in: &str) -> Result<i64, String> {
    let d = humantime::parse_duration(expires_in)
        .map_err(|e| format!("`{expires_in}` is not a duration like 30d: {e}"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok((now + d.as_secs()) as i64)
}

fn key_with_secret(key: &KeyRecord, secret: &SecretKey) -> serde_json::Value {
    json!({"key": key, "secret": secret.expose()})
}

fn result(r: Result<Response, Error>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /admin/keys`.
pub(crate) async fn create_key(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    result(
        async {
            check_admin(&gw, &headers)?;
            let req: CreateKey = serde_json::from_slice(&body)
                .map_err(|e| Error::AdminBadRequest(format!("invalid body: {e}")))?;
            if req.name.trim().is_empty() {
                return Err(Error::AdminBadRequest(
                    "a key needs a non-empty name".into(),
                ));
            }
            let expires_at = req
                .expires_in
                .as_deref()
                .map(expiry_from_now)
                .transpose()
                .map_err(Error::AdminBadRequest)?;
            let (key, secret) = gw
                .db
                .create_key(NewKey {
                    name: req.name,
                    models: req.models,
                    expires_at,
                })
                .await
                .map_err(admin_store_error)?;
            gw.keys.reload().await?;
            tracing::info!(key = %key.name, id = %key.id, "key created through the admin API");
            Ok((StatusCode::CREATED, Json(key_with_secret(&key, &secret))).into_response())
        }
        .await,
    )
}

/// `GET /admin/keys`.
pub(crate) async fn list_keys(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    result(
        async {
            check_admin(&gw, &headers)?;
            let keys = gw.db.list_keys().await?;
            Ok(Json(json!({"data": keys})).into_response())
        }
        .await,
    )
}

/// `POST /admin/keys/{id}/revoke`.
pub(crate) async fn revoke_key(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    result(
        async {
            check_admin(&gw, &headers)?;
            let key = gw.db.revoke_key(&id).await.map_err(admin_store_error)?;
            gw.keys.reload().await?;
            tracing::info!(key = %key.name, id = %key.id, "key revoked through the admin API");
            Ok(Json(json!({"key": key})).into_response())
        }
        .await,
    )
}

/// `POST /admin/keys/{id}/rotate`.
pub(crate) async fn rotate_key(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    result(
        async {
            check_admin(&gw, &headers)?;
            let (key, secret) = gw.db.rotate_key(&id).await.map_err(admin_store_error)?;
            gw.keys.reload().await?;
            tracing::info!(key = %key.name, id = %key.id, "key rotated through the admin API");
            Ok(Json(key_with_secret(&key, &secret)).into_response())
        }
        .await,
    )
}

/// Store errors an admin caused (unknown key, taken name) are 4xx, not 500s.
fn admin_store_error(e: tollgate_store::Error) -> Error {
    match e {
        tollgate_store::Error::KeyNotFound(_) => Error::AdminNotFound(e.to_string()),
        tollgate_store::Error::DuplicateName(_) => Error::AdminConflict(e.to_string()),
        other => Error::Store(other),
    }
}
