//! The admin REST API under `/admin`, guarded by the admin key: virtual keys
//! (create, list, revoke, rotate, change limits). A secret is in the response once, at
//! creation or rotation; only its hash is stored.

use crate::Gateway;
use crate::auth::bearer;
use crate::error::Error;
use crate::limits::check_names;
use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tollgate_core::limits::KeyLimits;
use tollgate_store::{KeyRecord, LimitsUpdate, NewKey, SecretHash, SecretKey};

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
    /// A preset of the config to start from.
    #[serde(default)]
    preset: Option<String>,
    /// A team of the config to belong to.
    #[serde(default)]
    team: Option<String>,
    /// The key's own limits, over the preset's.
    #[serde(default)]
    limits: KeyLimits,
}

/// Body of `PATCH /admin/keys/{id}`: fields left out stay as they are;
/// `null` removes a preset or team.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateKey {
    #[serde(default, deserialize_with = "present")]
    preset: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    team: Option<Option<String>>,
    #[serde(default)]
    limits: Option<KeyLimits>,
}

/// Tells a field set to `null` (`Some(None)`) from one left out (`None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
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
                .create_key({
                    check_names(&gw.config, req.preset.as_deref(), req.team.as_deref())
                        .map_err(Error::AdminBadRequest)?;
                    NewKey {
                        name: req.name,
                        models: req.models,
                        expires_at,
                        preset: req.preset,
                        team: req.team,
                        limits: req.limits,
                    }
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

/// `PATCH /admin/keys/{id}`: preset, team and limits.
pub(crate) async fn update_key(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    result(
        async {
            check_admin(&gw, &headers)?;
            let req: UpdateKey = serde_json::from_slice(&body)
                .map_err(|e| Error::AdminBadRequest(format!("invalid body: {e}")))?;
            check_names(
                &gw.config,
                req.preset.as_ref().and_then(Option::as_deref),
                req.team.as_ref().and_then(Option::as_deref),
            )
            .map_err(Error::AdminBadRequest)?;
            let update = LimitsUpdate {
                preset: req.preset,
                team: req.team,
                limits: req.limits,
            };
            let key = gw
                .db
                .update_key_limits(&id, update)
                .await
                .map_err(admin_store_error)?;
            gw.keys.reload().await?;
            tracing::info!(key = %key.name, id = %key.id, "key limits changed through the admin API");
            Ok(Json(json!({"key": key})).into_response())
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
