// Tollgate's dashboard: polls /ui/api/summary and draws it as plain SVG.
// No framework and no charting library: a few small functions below.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 5000;
let windowName = "hour";
let timer = null;

const $ = (id) => document.getElementById(id);

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

function usd(micros) {
  const dollars = micros / 1e6;
  // Micro-dollars are the ledger's unit: shown whole below $100.
  if (dollars >= 100) return "$" + dollars.toFixed(2);
  return "$" + dollars.toFixed(6);
}

function count(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return String(n);
}

function timeLabel(ms) {
  const d = new Date(ms);
  if (windowName === "month") return d.toISOString().slice(5, 10);
  return d.toISOString().slice(11, 16);
}

function empty(target, text) {
  target.replaceChildren();
  const p = document.createElement("p");
  p.className = "empty";
  p.textContent = text;
  target.appendChild(p);
}

// A stacked column chart over time: one column per bucket, one band per series.
function timeChart(target, points, series) {
  target.replaceChildren();
  const W = 1000, H = 220, L = 48, B = 22, T = 8;
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" }, target);
  const totals = points.map((p) => series.reduce((s, x) => s + p[x.field], 0));
  const max = Math.max(1, ...totals);
  const step = (W - L) / Math.max(1, points.length);
  for (let i = 0; i <= 4; i++) {
    const y = T + (H - T - B) * (1 - i / 4);
    el("line", { x1: L, x2: W, y1: y, y2: y, stroke: "#e4e7ec" }, svg);
    el("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, svg).textContent = count(Math.round((max * i) / 4));
  }
  points.forEach((p, i) => {
    let base = H - B;
    for (const s of series) {
      const h = ((H - T - B) * p[s.field]) / max;
      if (h > 0) {
        el("rect", {
          x: L + i * step + step * 0.1, y: base - h, width: Math.max(1, step * 0.8), height: h,
          fill: s.color, "data-series": s.field, "data-at": p.at, "data-value": p[s.field],
        }, svg).appendChild(el("title")).textContent = `${timeLabel(p.at)} ${s.label}: ${p[s.field]}`;
      }
      base -= h;
    }
    const every = Math.ceil(points.length / 10);
    if (i % every === 0) {
      el("text", { x: L + i * step + step / 2, y: H - 6, "text-anchor": "middle" }, svg).textContent = timeLabel(p.at);
    }
  });
}

// Horizontal bars: one per item, the value written at its end.
// `max` fixes the full-width value (100 for percentages); else the largest.
function bars(target, items, { format = String, color = "#2f6fed", kind, max } = {}) {
  if (items.length === 0) return empty(target, "Nothing in this window.");
  target.replaceChildren();
  const W = 480, row = 26, labelW = 130, textW = 170;
  const svg = el("svg", { viewBox: `0 0 ${W} ${items.length * row + 4}`, role: "img", "data-chart": kind }, target);
  max = max || Math.max(1, ...items.map((x) => x.value));
  items.forEach((item, i) => {
    const y = i * row + 2;
    const label = el("text", { x: 0, y: y + 16, class: "bar-label" }, svg);
    label.textContent = item.label.length > 20 ? item.label.slice(0, 19) + "…" : item.label;
    const w = Math.max(2, ((W - labelW - textW) * Math.min(item.value, max)) / max);
    el("rect", {
      x: labelW, y: y + 4, width: w, height: row - 10, rx: 3, fill: item.color || color,
      "data-label": item.label, "data-value": item.value,
    }, svg).appendChild(el("title")).textContent = `${item.label}: ${item.text || format(item.value)}`;
    el("text", { x: labelW + w + 6, y: y + 16 }, svg).textContent = item.text || format(item.value);
  });
}

const REASON_COLORS = {
  requests_per_minute: "#f59e0b", tokens_per_minute: "#f97316", requests_per_day: "#e5484d",
  tokens_per_day: "#be123c", credits: "#7c3aed", provider_limit: "#0ea5e9",
};

function reasonColor(reason) {
  if (reason.startsWith("budget_")) return "#db2777";
  return REASON_COLORS[reason] || "#667085";
}

function deploymentTiles(target, deployments) {
  target.replaceChildren();
  for (const d of deployments) {
    const box = document.createElement("div");
    box.className = "deployment";
    box.dataset.name = d.name;
    const state = document.createElement("span");
    const [cls, text] = d.circuit === "open" ? ["open", "circuit open"]
      : !d.available ? ["cooling", "cooling down"] : ["ok", "healthy"];
    state.className = "state " + cls;
    state.textContent = text;
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = d.name;
    name.appendChild(state);
    box.appendChild(name);
    const meta = document.createElement("div");
    meta.className = "meta";
    const lim = d.provider_limits || {};
    const parts = [d.models.join(", ")];
    for (const dim of ["requests", "tokens"]) {
      if (lim[dim]) parts.push(`${dim}: ${count(lim[dim].remaining)} / ${count(lim[dim].limit)} left`);
    }
    if (d.consecutive_failures) parts.push(`${d.consecutive_failures} failures in a row`);
    meta.textContent = parts.join(" · ");
    box.appendChild(meta);
    target.appendChild(box);
  }
}

function render(s) {
  $("total-requests").textContent = count(s.totals.requests);
  $("total-requests").dataset.value = s.totals.requests;
  $("total-tokens").textContent = `${count(s.totals.input_tokens)} / ${count(s.totals.output_tokens)}`;
  $("total-spend").textContent = usd(s.totals.cost_micros);
  $("total-spend").dataset.value = s.totals.cost_micros;
  $("total-throttled").textContent = count(s.totals.throttled);
  $("total-throttled").dataset.value = s.totals.throttled;
  timeChart($("chart-requests"), s.series, [{ field: "requests", label: "requests", color: "#2f6fed" }]);
  timeChart($("chart-tokens"), s.series, [
    { field: "input_tokens", label: "input tokens", color: "#2f6fed" },
    { field: "output_tokens", label: "output tokens", color: "#12b28c" },
  ]);
  for (const by of ["key", "team", "model"]) {
    bars($("spend-" + by), s.spend[by].map((l) => ({
      label: l.group === "-" ? `(no ${by})` : l.group, value: l.cost, text: `${usd(l.cost)} · ${count(l.requests)} req`,
    })), { kind: "spend-" + by });
  }
  bars($("throttled"), s.throttled.map((t) => ({
    label: t.scope, value: t.count, text: `${t.count} · ${t.reason}`, color: reasonColor(t.reason),
  })), { kind: "throttled" });
  bars($("budgets"), s.budgets.map((b) => ({
    label: `${b.scope} (${b.window})`, value: Math.round(b.used * 1000) / 10,
    text: `${usd(b.spent_micros)} of ${usd(b.cap_micros)}`,
    color: b.used >= 1 ? "#e5484d" : b.used >= 0.8 ? "#f59e0b" : "#12b28c",
  })), { kind: "budgets", max: 100 });
  bars($("accounts"), s.accounts.map((a) => ({
    label: a.name, value: Math.max(0, a.balance_micros),
    text: usd(a.balance_micros) + (a.held_micros ? ` (${usd(a.held_micros)} held)` : ""),
    color: a.low_balance_micros != null && a.balance_micros < a.low_balance_micros ? "#e5484d" : "#7c3aed",
  })), { kind: "accounts" });
  deploymentTiles($("deployments"), s.deployments);
  $("updated").textContent = "Updated " + new Date(s.now_ms).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  document.body.dataset.loaded = "true";
}

function show(which) {
  $("login").hidden = which !== "login";
  $("dashboard").hidden = which !== "dashboard";
  $("nav").hidden = which !== "dashboard";
}

async function refresh() {
  clearTimeout(timer);
  let resp;
  try {
    resp = await fetch(`/ui/api/summary?window=${windowName}`, { credentials: "same-origin" });
  } catch (e) {
    $("updated").textContent = "The gateway is not answering; retrying.";
    timer = setTimeout(refresh, POLL_MS);
    return;
  }
  if (resp.status === 401 || resp.status === 404) {
    show("login");
    return;
  }
  if (resp.ok) {
    show("dashboard");
    render(await resp.json());
  }
  timer = setTimeout(refresh, POLL_MS);
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("login-error").textContent = "";
  const resp = await fetch("/ui/login", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ key: $("admin-key").value }),
    credentials: "same-origin",
  });
  $("admin-key").value = "";
  if (resp.status === 204) {
    refresh();
  } else {
    $("login-error").textContent = resp.status === 401 ? "That is not the admin key." : "Sign-in failed (" + resp.status + ").";
  }
});

$("logout").addEventListener("click", async () => {
  await fetch("/ui/logout", { method: "POST", credentials: "same-origin" });
  clearTimeout(timer);
  show("login");
});

for (const b of document.querySelectorAll("[data-window]")) {
  b.addEventListener("click", () => {
    windowName = b.dataset.window;
    for (const o of document.querySelectorAll("[data-window]")) o.setAttribute("aria-pressed", String(o === b));
    refresh();
  });
}

refresh();
