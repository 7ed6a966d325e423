//! The admin REST API under `/admin`, guarded by the admin key: virtual keys
//! (create, list, revoke, rotate, change limits), budgets, credits and
//! usage reports. A secret is in the response once, at creation or
//! rotation; only its hash is stored.

use crate::Gateway;
use crate::auth::bearer;
use crate::error::Error;
use crate::limits::check_names;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tollgate_core::limits::KeyLimits;
use tollgate_core::money::{Budget, Usd, Window, check_scope, parse_usd, parse_utc_date};
use tollgate_store::ledger::GroupBy;
use tollgate_store::{KeyRecord, LimitsUpdate, NewKey, SecretKey};

fn check_admin(gw: &Gateway, headers: &HeaderMap) -> Result<(), Error> {
    if !gw.admin_enabled() {
        return Err(Error::AdminDisabled);
    }
    gw.check_admin_key(bearer(headers).ok_or(Error::AdminUnauthorized)?)
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
    /// The prepaid account it draws from.
    #[serde(default)]
    account: Option<String>,
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
    #[serde(default, deserialize_with = "present")]
    account: Option<Option<String>>,
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

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::AdminBadRequest(format!("invalid body: {e}")))
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
            let req: CreateKey = parse_body(&body)?;
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
                        account: req.account,
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
            let req: UpdateKey = parse_body(&body)?;
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
                account: req.account,
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
        tollgate_store::Error::KeyNotFound(_) | tollgate_store::Error::AccountNotFound(_) => {
            Error::AdminNotFound(e.to_string())
        }
        tollgate_store::Error::DuplicateName(_) => Error::AdminConflict(e.to_string()),
        other => Error::Store(other),
    }
}

/// Body of `PUT /admin/budgets`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetBudget {
    scope: String,
    window: String,
    cap_usd: String,
    #[serde(default)]
    alert_percent: Option<u8>,
}

/// `?scope=…&window=…` of `DELETE /admin/budgets`.
#[derive(Debug, Deserialize)]
pub(crate) struct BudgetKey {
    scope: String,
    window: String,
}

/// Reads a budget's scope, window and cap as an admin wrote them.
pub fn budget_from_text(
    scope: &str,
    window: &str,
    cap_usd: &str,
    alert_percent: Option<u8>,
) -> Result<Budget, String> {
    check_scope(scope)?;
    let window: Window = window.parse()?;
    let cap = parse_usd(cap_usd).map_err(|e| e.to_string())?;
    if cap < 0 {
        return Err("a budget's cap cannot be negative".into());
    }
    if alert_percent.is_some_and(|p| p == 0 || p > 100) {
        return Err("alert_percent is a share between 1 and 100".into());
    }
    Ok(Budget {
        scope: Arc::from(scope),
        window,
        cap,
        alert_percent,
    })
}

fn budget_json(b: &Budget) -> serde_json::Value {
    json!({"scope": &*b.scope, "window": b.window.as_str(), "cap_usd": Usd(b.cap).to_string(), "alert_percent": b.alert_percent})
}

/// `PUT /admin/budgets`: sets (or replaces) a scope's budget over a window.
pub(crate) async fn set_budget(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    result(
        async {
            check_admin(&gw, &headers)?;
            let req: SetBudget = parse_body(&body)?;
            let budget =
                budget_from_text(&req.scope, &req.window, &req.cap_usd, req.alert_percent)
                    .map_err(Error::AdminBadRequest)?;
            gw.db.set_budget(&budget).await?;
            gw.money.sync().await?;
            tracing::info!(scope = %budget.scope, window = %budget.window, cap_usd = %Usd(budget.cap), "budget set through the admin API");
            Ok(Json(json!({"budget": budget_json(&budget)})).into_response())
        }
        .await,
    )
}

/// `GET /admin/budgets`.
pub(crate) async fn list_budgets(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    result(
        async {
            check_admin(&gw, &headers)?;
            let budgets = gw.db.list_budgets().await?;
            let data: Vec<_> = budgets.iter().map(budget_json).collect();
            Ok(Json(json!({"data": data})).into_response())
        }
        .await,
    )
}

/// `DELETE /admin/budgets?scope=…&window=…`.
pub(crate) async fn remove_budget(
    State(gw): State<Arc<Gateway>>,
    Query(key): Query<BudgetKey>,
    headers: HeaderMap,
) -> Response {
    result(
        async {
            check_admin(&gw, &headers)?;
            let window: Window = key.window.parse().map_err(Error::AdminBadRequest)?;
            if !gw.db.remove_budget(&key.scope, window).await? {
                return Err(Error::AdminNotFound(format!(
                    "no {window} budget on `{}`",
                    key.scope
                )));
            }
            gw.money.sync().await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

/// Body of `POST /admin/credits/{account}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddCredits {
    amount_usd: String,
    why: String,
    #[serde(default)]
    who: Option<String>,
    #[serde(default)]
    low_balance_usd: Option<String>,
}

/// `POST /admin/credits/{account}`: a top-up (or, negative, an adjustment).
pub(crate) async fn add_credits(
    State(gw): State<Arc<Gateway>>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    result(
        async {
            check_admin(&gw, &headers)?;
            let req: AddCredits = parse_body(&body)?;
            let amount = parse_usd(&req.amount_usd).map_err(|e| Error::AdminBadRequest(e.to_string()))?;
            if req.why.trim().is_empty() {
                return Err(Error::AdminBadRequest("say why: a ledger entry needs a reason".into()));
            }
            let who = req.who.as_deref().unwrap_or("admin-api");
            let entry = gw.db.add_credits(&account, amount, who, &req.why).await?;
            if let Some(mark) = &req.low_balance_usd {
                let mark = parse_usd(mark).map_err(|e| Error::AdminBadRequest(e.to_string()))?;
                gw.db.set_low_balance(&account, Some(mark)).await?;
            }
            gw.money.sync().await?;
            tracing::info!(%account, amount_usd = %Usd(amount), who, "credits added through the admin API");
            let balance = gw.db.find_account(&account).await?.balance;
            Ok(Json(json!({"entry": entry, "balance_usd": Usd(balance).to_string()})).into_response())
        }
        .await,
    )
}

/// `GET /admin/credits/{account}`: the balance and the entries behind it.
pub(crate) async fn show_credits(
    State(gw): State<Arc<Gateway>>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Response {
    result(
        async {
            check_admin(&gw, &headers)?;
            let a = gw
                .db
                .find_account(&account)
                .await
                .map_err(admin_store_error)?;
            let entries = gw.db.credit_entries(Some(&account), 0).await?;
            let held = gw.money.funds(&account).await?.map_or(0, |(_, held)| held);
            Ok(Json(json!({
                "account": a.name,
                "balance_usd": Usd(a.balance).to_string(),
                "held_usd": Usd(held).to_string(),
                "low_balance_usd": a.low_balance.map(|l| Usd(l).to_string()),
                "entries": entries,
            }))
            .into_response())
        }
        .await,
    )
}

/// `?by=key&since=2026-11-01&until=2026-12-01` of `GET /admin/usage`.
#[derive(Debug, Deserialize)]
pub(crate) struct UsageQuery {
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
}

/// Reads a report's `since` / `until` dates (UTC days) into Unix ms.
pub fn report_range(since: Option<&str>, until: Option<&str>) -> Result<(i64, i64), String> {
    let day = |t: &str| {
        parse_utc_date(t)
            .map(|ns| (ns / 1_000_000) as i64)
            .ok_or_else(|| format!("`{t}` is not a date like 2026-11-01"))
    };
    let since = since.map(day).transpose()?.unwrap_or(0);
    // `until` names the last day included.
    let until = until
        .map(day)
        .transpose()?
        .map_or(i64::MAX, |u| u + 86_400_000);
    Ok((since, until))
}

/// `GET /admin/usage`: spend and tokens grouped by key, team, user, model,
/// account or day.
pub(crate) async fn usage(
    State(gw): State<Arc<Gateway>>,
    Query(q): Query<UsageQuery>,
    headers: HeaderMap,
) -> Response {
    result(
        async {
            check_admin(&gw, &headers)?;
            let by: GroupBy =
                q.by.as_deref()
                    .unwrap_or("key")
                    .parse()
                    .map_err(Error::AdminBadRequest)?;
            let (since, until) = report_range(q.since.as_deref(), q.until.as_deref())
                .map_err(Error::AdminBadRequest)?;
            gw.money.flush().await;
            let lines = gw.db.usage_report(by, since, until).await?;
            let data: Vec<_> = lines
                .iter()
                .map(|l| {
                    json!({
                        "group": l.group, "requests": l.requests, "input_tokens": l.input_tokens,
                        "cached_tokens": l.cached_tokens, "output_tokens": l.output_tokens,
                        "cost_usd": Usd(l.cost).to_string(), "cost_micros": l.cost,
                    })
                })
                .collect();
            Ok(Json(json!({"by": q.by.as_deref().unwrap_or("key"), "data": data})).into_response())
        }
        .await,
    )
}

/// `GET /admin/deployments`: each deployment's models and health (cooling
/// down after a 429, circuit open after failures).
pub(crate) async fn deployments(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    result(
        async {
            check_admin(&gw, &headers)?;
            let data = gw.deployments_view();
            Ok(Json(json!({"data": data})).into_response())
        }
        .await,
    )
}
