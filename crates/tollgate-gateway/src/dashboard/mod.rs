//! The usage dashboard at `/ui`: one page built into the binary (HTML,
//! plain JavaScript and SVG charts; no CDN, works offline), a login form
//! that trades the admin key for a session cookie (the key never rides in a
//! URL), and one JSON summary the page polls.

pub mod throttles;

use crate::Gateway;
use crate::error::Error;
use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use throttles::ThrottleLog;
use tollgate_core::money::Window;
use tollgate_store::ledger::GroupBy;
use tollgate_store::{SecretHash, SecretKey};

const INDEX_HTML: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const STYLE_CSS: &str = include_str!("../../ui/style.css");

/// The session cookie's name.
const COOKIE_NAME: &str = "tollgate_ui";
/// How long a login lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Dashboard state: logged-in sessions and the refusal counts.
#[derive(Debug, Default)]
pub struct Dashboard {
    /// Session token hash → expiry.
    sessions: Mutex<HashMap<SecretHash, Instant>>,
    /// Who was refused, and why.
    pub throttles: ThrottleLog,
}

impl Dashboard {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<SecretHash, Instant>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open_session(&self) -> Result<SecretKey, Error> {
        let token = SecretKey::generate().map_err(|e| Error::Internal(e.to_string()))?;
        let now = Instant::now();
        let mut sessions = self.sessions();
        sessions.retain(|_, expiry| *expiry > now);
        sessions.insert(token.hash(), now + SESSION_TTL);
        Ok(token)
    }

    fn session_valid(&self, headers: &HeaderMap) -> bool {
        let Some(token) = session_cookie(headers) else {
            return false;
        };
        self.sessions()
            .get(&SecretHash::of(token))
            .is_some_and(|expiry| *expiry > Instant::now())
    }

    fn close_session(&self, headers: &HeaderMap) {
        if let Some(token) = session_cookie(headers) {
            self.sessions().remove(&SecretHash::of(token));
        }
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE_NAME)?.strip_prefix('='))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
                ),
            ),
        ],
        body,
    )
        .into_response()
}

/// `GET /ui`.
pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /ui/app.js`.
pub(crate) async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /ui/style.css`.
pub(crate) async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// Body of `POST /ui/login`.
#[derive(Debug, Deserialize)]
pub(crate) struct Login {
    key: String,
}

/// `POST /ui/login`: the admin key for a session cookie.
pub(crate) async fn login(State(gw): State<Arc<Gateway>>, body: Json<Login>) -> Response {
    if let Err(e) = gw.check_admin_key(&body.key) {
        return crate::error::api_error_response(&e.to_api_error());
    }
    match gw.dashboard.open_session() {
        Ok(token) => {
            let cookie = format!(
                "{COOKIE_NAME}={}; HttpOnly; SameSite=Strict; Path=/ui; Max-Age={}",
                token.expose(),
                SESSION_TTL.as_secs()
            );
            match HeaderValue::from_str(&cookie) {
                Ok(v) => (StatusCode::NO_CONTENT, [(SET_COOKIE, v)]).into_response(),
                Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
        Err(e) => crate::error::api_error_response(&e.to_api_error()),
    }
}

/// `POST /ui/logout`.
pub(crate) async fn logout(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    gw.dashboard.close_session(&headers);
    let gone = format!("{COOKIE_NAME}=; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=0");
    match HeaderValue::from_str(&gone) {
        Ok(v) => (StatusCode::NO_CONTENT, [(SET_COOKIE, v)]).into_response(),
        Err(_) => StatusCode::NO_CONTENT.into_response(),
    }
}

/// Query of `GET /ui/api/summary`.
#[derive(Debug, Deserialize)]
pub(crate) struct SummaryQuery {
    #[serde(default)]
    window: Option<String>,
}

/// A window the page can show: its length and its chart's bucket.
fn span_of(window: &str) -> Option<(i64, i64)> {
    const MIN: i64 = 60_000;
    match window {
        "hour" => Some((60 * MIN, MIN)),
        "day" => Some((24 * 60 * MIN, 15 * MIN)),
        "month" => Some((30 * 24 * 60 * MIN, 24 * 60 * MIN)),
        _ => None,
    }
}

/// `GET /ui/api/summary?window=hour|day|month`: everything the page shows.
pub(crate) async fn summary(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(q): Query<SummaryQuery>,
) -> Response {
    if !gw.dashboard.session_valid(&headers) {
        return crate::error::api_error_response(&Error::AdminUnauthorized.to_api_error());
    }
    let window = q.window.as_deref().unwrap_or("hour");
    let Some((length, bucket)) = span_of(window) else {
        return crate::error::api_error_response(
            &Error::AdminBadRequest(format!("unknown window `{window}` (hour, day or month)"))
                .to_api_error(),
        );
    };
    match collect(&gw, window, length, bucket).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => crate::error::api_error_response(&e.to_api_error()),
    }
}

async fn collect(
    gw: &Gateway,
    window: &str,
    length: i64,
    bucket: i64,
) -> Result<serde_json::Value, Error> {
    let now_ns = gw.limits.clock().now_ns();
    let now_ms = (now_ns / 1_000_000) as i64;
    // Whole buckets, the current one last.
    let first = now_ms - now_ms.rem_euclid(bucket) - length + bucket;
    let until = now_ms + 1;
    let points = gw.db.usage_series(first, until, bucket).await?;
    let mut series = Vec::with_capacity((length / bucket) as usize);
    let mut at = first;
    let mut points = points.into_iter().peekable();
    let mut totals = tollgate_store::ledger::UsagePoint::default();
    while at < until {
        let p = match points.peek() {
            Some(p) if p.at == at => points.next().unwrap_or_default(),
            _ => tollgate_store::ledger::UsagePoint {
                at,
                ..Default::default()
            },
        };
        totals.requests += p.requests;
        totals.input_tokens += p.input_tokens;
        totals.cached_tokens += p.cached_tokens;
        totals.output_tokens += p.output_tokens;
        totals.cost += p.cost;
        series.push(p);
        at += bucket;
    }
    let mut spend = serde_json::Map::new();
    for (name, by) in [
        ("key", GroupBy::Key),
        ("team", GroupBy::Team),
        ("model", GroupBy::Model),
    ] {
        let mut lines = gw.db.usage_report(by, first, until).await?;
        lines.truncate(10);
        spend.insert(name.into(), serde_json::to_value(lines).unwrap_or_default());
    }
    let throttled = gw.dashboard.throttles.top(first, now_ms, 10);
    let throttled_total = gw.dashboard.throttles.total(first, now_ms);

    let mut budgets = Vec::new();
    for b in gw.db.list_budgets().await? {
        if b.scope.contains('*') {
            continue;
        }
        let (spent, reserved) = gw.money.spend(&b.scope, b.window, now_ns).await?;
        budgets.push(json!({
            "scope": &*b.scope,
            "window": b.window.to_string(),
            "cap_micros": b.cap,
            "spent_micros": spent,
            "reserved_micros": reserved,
            "used": if b.cap > 0 { (spent + reserved) as f64 / b.cap as f64 } else { 1.0 },
        }));
    }
    let mut accounts = Vec::new();
    for a in gw.db.list_accounts().await? {
        let (balance, held) = gw.money.funds(&a.name).await?.unwrap_or((a.balance, 0));
        accounts.push(json!({
            "name": a.name,
            "balance_micros": balance,
            "held_micros": held,
            "low_balance_micros": a.low_balance,
        }));
    }
    let deployments = gw.deployments_view();
    Ok(json!({
        "window": window,
        "now_ms": now_ms,
        "since_ms": first,
        "bucket_ms": bucket,
        "totals": {
            "requests": totals.requests,
            "input_tokens": totals.input_tokens,
            "output_tokens": totals.output_tokens,
            "cost_micros": totals.cost,
            "throttled": throttled_total,
        },
        "series": series,
        "spend": spend,
        "throttled": throttled,
        "budgets": budgets,
        "accounts": accounts,
        "deployments": deployments,
    }))
}

/// The budget reason label for a window.
pub fn budget_reason(window: Window) -> &'static str {
    match window {
        Window::Day => "budget_day",
        Window::Week => "budget_week",
        Window::Month => "budget_month",
        Window::Lifetime => "budget_lifetime",
    }
}
