// Drives the dashboard in Debian's Chromium with Playwright, as a person would: open the page, wait until the
// graph shows the expected edges with traffic, click a service node, wait for its charts, take a screenshot.
// Usage: node browse.mjs '<json options>'; prints one JSON line with what it saw (the Python tests assert on it).
// Options: url, screenshot (path), expect ([[sourceId, targetId], ...]), click (node id), minNodes,
// timeoutMs, chromium (path, default /usr/bin/chromium), profile (an empty directory for --user-data-dir),
// tracesScreenshot (path: also open the trace list, click the first trace, screenshot its waterfall).
import { chromium } from "playwright-core";

const options = JSON.parse(process.argv[2]);
const timeout = options.timeoutMs ?? 30000;
const context = await chromium.launchPersistentContext(options.profile, {
  executablePath: options.chromium ?? "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1400, height: 900 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const result = { errors: [] };
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("pageerror", (err) => result.errors.push(String(err)));
  const started = Date.now();
  await page.goto(options.url, { timeout });
  await page.waitForFunction(({ expect, minNodes }) => {
    const cy = window.kizuna?.cy;
    if (!cy || cy.nodes().length < minNodes) return false;
    return expect.every(([s, t]) => cy.edges().some((e) => e.data("source") === s && e.data("target") === t
      && (e.data("rps") > 0 || e.data("tcpConnectionsPerSecond") > 0)));
  }, { expect: options.expect ?? [], minNodes: options.minNodes ?? 1 }, { timeout, polling: 200 });
  result.graphMs = Date.now() - started;
  result.edges = await page.evaluate(() => window.kizuna.cy.edges().map((e) => {
    const { source, target, service, rps, errorRate, p99, mtls, label } = e.data();
    return { source, target, service, rps, errorRate, p99, mtls, label };
  }));
  result.nodes = await page.evaluate(() => window.kizuna.cy.nodes().map((n) => n.id()));
  if (options.click) {
    // Click where the node is drawn: a real mouse click on the canvas, not a call into cytoscape. A refresh
    // that brings new edges lays the graph out again, and may do so between finding the node and clicking:
    // as a person would, click again (at most three times) when another service opened.
    const wanted = options.click.split("/").pop();
    for (let attempt = 1; ; attempt++) {
      const box = await page.evaluate((id) => {
        const node = window.kizuna.cy.getElementById(id);
        if (node.empty()) return null;
        const rect = window.kizuna.cy.container().getBoundingClientRect();
        const child = node.children().first();
        const pos = (child.nonempty() ? child : node).renderedPosition();
        return { x: rect.left + pos.x, y: rect.top + pos.y };
      }, options.click);
      if (!box) throw new Error(`no node ${options.click} in the graph`);
      const clicked = Date.now();
      await page.mouse.click(box.x, box.y);
      try {
        await page.waitForFunction((name) => {
          const s = window.kizuna.service;
          const title = document.querySelector("#service-title")?.textContent ?? "";
          return s && title.startsWith(name) && document.querySelectorAll("#charts canvas").length >= 3
            && s.series.rps.some((v) => v > 0);
        }, wanted, { timeout: attempt === 3 ? timeout : Math.min(timeout, 10000), polling: 100 });
      } catch (err) {
        if (attempt === 3) throw err;
        continue;
      }
      result.clickMs = Date.now() - clicked;
      result.clicks = attempt;
      break;
    }
    result.title = await page.textContent("#service-title");
    result.charts = await page.locator("#charts canvas").count();
    result.config = await page.textContent("#service-config");
    result.proxies = await page.textContent("#service-proxies");
    result.series = await page.evaluate(() => window.kizuna.service.series);
    result.hash = await page.evaluate(() => window.location.hash);
  }
  if (options.tracesScreenshot && options.screenshot) {
    await page.screenshot({ path: options.screenshot, fullPage: false });
  }
  if (options.tracesScreenshot) {
    // The trace list, then a click on the first trace: its waterfall, one row per span.
    await page.click("#traces-link");
    await page.waitForSelector("#trace-list a", { timeout });
    result.traceCount = await page.locator("#trace-list a").count();
    await page.locator("#trace-list a").first().click();
    await page.waitForSelector("#waterfall .span-row", { timeout });
    result.waterfallRows = await page.locator("#waterfall .span-row").count();
    result.traceSpans = await page.evaluate(() => window.kizuna.trace.spans.length);
    result.traceHash = await page.evaluate(() => window.location.hash);
    await page.screenshot({ path: options.tracesScreenshot, fullPage: false });
  }
  // Responsiveness: how long the page takes to answer while it keeps refreshing.
  const probes = [];
  for (let i = 0; i < 5; i += 1) {
    const t0 = Date.now();
    await page.evaluate(() => new Promise((resolve) => requestAnimationFrame(() => resolve())));
    probes.push(Date.now() - t0);
    await page.waitForTimeout(300);
  }
  result.frameMs = Math.max(...probes);
  if (options.screenshot && !options.tracesScreenshot) {
    await page.screenshot({ path: options.screenshot, fullPage: false });
  }
  result.ok = true;
} catch (err) {
  result.ok = false;
  result.failure = String(err);
} finally {
  await context.close();
}
console.log(JSON.stringify(result));
