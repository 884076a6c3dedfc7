// The status page in real headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core; no browser is ever downloaded). Run by tests/e2e/test_operations_browser.py:
//
//   node tests/browser/status_page.mjs --page URL --leader NAME --next NAME \
//        --resign URL --screenshot-before PNG --screenshot PNG
//
// Opens the page of a replica, checks that it shows NAME as leader, asks the leader to resign
// (POST --resign), and checks that the same page, without a reload, shows NEXT as leader and the
// handover in its timeline. Every wait is bounded; any failure exits 1 with a message.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => {
    if (arg.startsWith("--")) pairs.push([arg.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
for (const key of ["page", "leader", "next", "resign", "screenshot"]) {
  if (!args[key]) {
    console.error(`missing --${key}`);
    process.exit(2);
  }
}
const TIMEOUT = 15000;
const profile = mkdtempSync(join(tmpdir(), "leader-sidecar-chromium-"));
// A fresh profile directory every run (launchPersistentContext is how Playwright takes one).
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  viewport: { width: 1200, height: 860 },
  timeout: TIMEOUT,
});
const failures = [];
try {
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(TIMEOUT);
  const origin = new URL(args.page).origin;
  const foreign = [];
  page.on("request", (request) => {
    if (new URL(request.url()).origin !== origin) foreign.push(request.url());
  });
  page.on("console", (message) => {
    if (message.type() === "error") failures.push(`console error: ${message.text()}`);
  });
  page.on("pageerror", (error) => failures.push(`page error: ${error.message}`));
  let navigations = 0;
  page.on("framenavigated", (frame) => {
    if (frame === page.mainFrame()) navigations += 1;
  });

  const response = await page.goto(args.page, { waitUntil: "domcontentloaded" });
  const type = response.headers()["content-type"] || "";
  if (!type.startsWith("text/html")) throw new Error(`the page answered ${type}, not HTML`);

  await page.waitForFunction(
    (name) => document.getElementById("leader").textContent === name,
    args.leader,
  );
  await page.waitForFunction(() => document.getElementById("connection").dataset.state === "live");
  const before = await page.evaluate(() => ({
    role: document.getElementById("role").textContent,
    identity: document.getElementById("identity").textContent,
    token: document.getElementById("fencing-token").textContent,
    rows: document.querySelectorAll("#timeline tr").length,
  }));
  if (args["screenshot-before"]) {
    await page.screenshot({ path: args["screenshot-before"], fullPage: true });
  }
  // A marker that a reload would wipe out.
  await page.evaluate(() => {
    window.__notReloaded = true;
  });

  const resign = await fetch(args.resign, { method: "POST" });
  if (resign.status !== 200) throw new Error(`resign answered ${resign.status}`);

  await page.waitForFunction(
    (name) => document.getElementById("leader").textContent === name,
    args.next,
  );
  await page.waitForFunction(
    ([from, to]) =>
      [...document.querySelectorAll("#timeline tr td:nth-child(2)")].some((td) =>
        td.textContent.includes(`handover ${from} → ${to}`) ||
        td.textContent.includes(`${to} leads`),
      ),
    [args.leader, args.next],
  );
  const after = await page.evaluate(() => ({
    notReloaded: window.__notReloaded === true,
    role: document.getElementById("role").textContent,
    identity: document.getElementById("identity").textContent,
    token: document.getElementById("fencing-token").textContent,
    title: document.title,
    rows: [...document.querySelectorAll("#timeline tr")].map((tr) =>
      [...tr.querySelectorAll("td")].map((td) => td.textContent),
    ),
    leaseName: document.getElementById("lease-name").textContent,
  }));
  await page.screenshot({ path: args.screenshot, fullPage: true });

  if (!after.notReloaded || navigations !== 1) failures.push("the page was reloaded");
  if (after.rows.length <= before.rows) failures.push("the timeline did not grow");
  if (foreign.length) failures.push(`requests to other origins: ${foreign.join(", ")}`);
  console.log(JSON.stringify({ before, after, navigations }));
} catch (error) {
  failures.push(String(error && error.stack ? error.stack : error));
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
if (failures.length) {
  console.error(failures.join("\n"));
  process.exit(1);
}
