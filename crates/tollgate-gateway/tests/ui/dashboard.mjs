// Drives the /ui dashboard in Debian's Chromium: a wrong key is refused,
// the right one signs in, the charts render, and a screenshot is saved.
// Prints what the page shows as one JSON object; the Rust test checks it.
//
// usage: node dashboard.mjs BASE_URL ADMIN_KEY SCREENSHOT_PATH
import { chromium } from "playwright-core";

const [base, adminKey, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const failed = [];
  page.on("requestfailed", (r) => failed.push(r.url()));
  page.on("pageerror", (e) => failed.push("page error: " + e.message));

  await page.goto(base + "/ui", { waitUntil: "load" });
  const loadMs = await page.evaluate(() => {
    const nav = performance.getEntriesByType("navigation")[0];
    return nav.loadEventEnd - nav.startTime;
  });
  await page.locator("#login-form").waitFor({ state: "visible" });

  await page.fill("#admin-key", "not-the-key");
  await page.click("#login-form button[type=submit]");
  await page.locator("#login-error").filter({ hasText: "not the admin key" }).waitFor();

  await page.fill("#admin-key", adminKey);
  await page.click("#login-form button[type=submit]");
  await page.locator("body[data-loaded=true]").waitFor();

  const shown = await page.evaluate(() => {
    const num = (id) => Number(document.getElementById(id).dataset.value);
    const bars = (id) =>
      [...document.querySelectorAll(`#${id} rect[data-label]`)].map((r) => ({
        label: r.dataset.label,
        value: Number(r.dataset.value),
      }));
    const columns = [...document.querySelectorAll("#chart-requests rect[data-series=requests]")];
    return {
      requests: num("total-requests"),
      spend_micros: num("total-spend"),
      throttled: num("total-throttled"),
      requests_charted: columns.reduce((s, r) => s + Number(r.dataset.value), 0),
      token_columns: document.querySelectorAll("#chart-tokens rect").length,
      spend_by_key: bars("spend-key"),
      throttled_subjects: bars("throttled"),
      budgets: bars("budgets"),
      accounts: bars("accounts"),
      deployments: [...document.querySelectorAll("#deployments .deployment")].map((d) => d.dataset.name),
      login_hidden: document.getElementById("login").hidden,
    };
  });
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ ...shown, url: page.url(), load_ms: loadMs, failed }));
} finally {
  await browser.close();
}
