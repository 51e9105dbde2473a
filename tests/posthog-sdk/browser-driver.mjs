// Drives headless Chromium (Debian's, through playwright-core) for tests/tests/ingest_browser.rs:
// a page served from this driver's own origin (another port than the collector's) runs
// (a) Segment's @segment/analytics-next, (b) posthog-js, both pointed at the collector and
// loaded from node_modules, (c) a pixel <img> and (d) a sendBeacon on page hide.
//
//   node browser-driver.mjs COLLECTOR_URL WRITE_KEY RUN_ID
//
// Talks to the test in lines: prints {"phase":"called",...} once the page made its calls, then
// waits for a line on stdin (the test restores a cut collector and waits for the calls to be
// stored), has posthog-js send a beacon, hides the page (pagehide: a sendBeacon), prints the report
// {"phase":"done", "events": [...], "console": [...], "failed": [...], "http_errors": [...]} and
// exits. Only loopback addresses are let through; any other request is aborted and reported.
// SLUICE_BROWSER_DEBUG=1 prints the page's console (posthog-js in debug mode) on stderr.

import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { createInterface } from 'node:readline';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const [collector, writeKey, runId] = process.argv.slice(2);
if (!collector || !writeKey || !runId) {
  console.error('usage: node browser-driver.mjs COLLECTOR_URL WRITE_KEY RUN_ID');
  process.exit(2);
}
const here = path.dirname(fileURLToPath(import.meta.url));
const modules = path.join(here, 'node_modules');
const collectorHost = new URL(collector).host;

// The page: everything a site would put on it, pointed at the collector. Every id an SDK
// made is recorded in localStorage, so calls made while the page is being hidden are known
// too; the test then finds each of them stored exactly once.
function page(origin) {
  const config = JSON.stringify({ collector, collectorHost, writeKey, runId, origin });
  return `<!doctype html>
<html><head><meta charset="utf-8"><title>sluice browser test</title><link rel="icon" href="data:,"></head>
<body>
<h1>sluice browser test</h1>
<img id="pixel" alt="" width="1" height="1"
  src="${collector}/v1/p.gif?k=${encodeURIComponent(writeKey)}&e=Pixel%20Viewed&a=pixel-anon-${runId}&m=pixel-${runId}&url=${encodeURIComponent(origin + '/?utm_source=pixel')}">
<script src="/analytics-next/bundles/index.js"></script>
<script src="/posthog/array.js"></script>
<script>
const cfg = ${config};
const recorded = () => JSON.parse(localStorage.getItem('sluice-events') || '[]');
const record = (sdk, type, id) => {
  localStorage.setItem('sluice-events', JSON.stringify([...recorded(), { sdk, type, id }]));
};
window.sluiceCalls = (async () => {
  // (c) The pixel: an <img> is never retried, so it counts only when it loaded.
  const img = document.getElementById('pixel');
  await new Promise((resolve) => {
    if (img.complete) resolve(); else { img.onload = resolve; img.onerror = resolve; }
  });
  if (img.naturalWidth > 0) record('pixel', 'pixel', 'pixel-' + cfg.runId);
  // (a) Segment's browser SDK, with the settings its CDN would serve given inline.
  const [analytics] = await AnalyticsNext.AnalyticsBrowser.load({
    writeKey: cfg.writeKey,
    cdnURL: cfg.origin,
    cdnSettings: { integrations: { 'Segment.io': {
      apiKey: cfg.writeKey, apiHost: cfg.collectorHost + '/v1', protocol: 'http' } } },
  });
  const seg = async (type, ctx) => record('segment', type, (await ctx).event.messageId);
  const segCalls = [
    seg('page', analytics.page('Docs', 'Browser Pricing', { path: '/pricing' })),
    seg('track', analytics.track('Browser Signed Up', { plan: 'pro' })),
    seg('identify', analytics.identify('seg-browser-user-' + cfg.runId, { plan: 'pro' })),
    seg('group', analytics.group('seg-browser-group', { name: 'Initech' })),
    seg('alias', analytics.alias('seg-browser-user-' + cfg.runId, 'seg-browser-old-' + cfg.runId)),
  ];
  // (b) PostHog's browser SDK; before_send only records the uuid of what it sends.
  posthog.init(cfg.writeKey, {
    api_host: cfg.collector,
    debug: location.search.includes('debug'),
    before_send: (event) => { record('posthog', event.event, event.uuid); return event; },
  });
  posthog.capture('Browser Clicked', { button: 'buy' });
  posthog.identify('ph-browser-user-' + cfg.runId, { plan: 'team' });
  posthog.group('company', 'ph-browser-company', { name: 'Hooli' });
  await Promise.all(segCalls);
  // (d) A beacon when the page is hidden, as sites send their last event.
  addEventListener('pagehide', () => {
    const ok = navigator.sendBeacon(cfg.collector + '/v1/track', JSON.stringify({
      writeKey: cfg.writeKey, event: 'Page Hidden', anonymousId: 'beacon-anon-' + cfg.runId,
      messageId: 'beacon-' + cfg.runId }));
    record('beacon', ok ? 'track' : 'refused', 'beacon-' + cfg.runId);
  });
  return true;
})();
</script>
</body></html>`;
}

const types = { '.js': 'application/javascript', '.html': 'text/html' };
const server = createServer(async (req, res) => {
  const url = new URL(req.url, 'http://x');
  const files = {
    '/analytics-next/bundles/': path.join(modules, '@segment/analytics-next/dist/umd/'),
    '/posthog/': path.join(modules, 'posthog-js/dist/'),
  };
  try {
    if (url.pathname === '/' || url.pathname === '/done') {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end(url.pathname === '/' ? page(`http://${req.headers.host}`) : '<!doctype html><title>done</title>');
      return;
    }
    for (const [prefix, dir] of Object.entries(files)) {
      if (url.pathname.startsWith(prefix)) {
        const file = path.join(dir, path.normalize(url.pathname.slice(prefix.length)));
        if (!file.startsWith(dir)) break;
        const body = await readFile(file);
        res.writeHead(200, { 'content-type': types[path.extname(file)] ?? 'application/octet-stream' });
        res.end(body);
        return;
      }
    }
  } catch {
    // Falls through to the 404, which the page's report shows.
  }
  res.writeHead(404);
  res.end();
});
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const origin = `http://127.0.0.1:${server.address().port}`;

const report = { phase: 'done', origin, events: [], console: [], failed: [], http_errors: [], blocked: [] };
const browser = await chromium.launch({
  executablePath: process.env.SLUICE_CHROMIUM ?? '/usr/bin/chromium',
  // posthog-js drops every event of a browser that says it is automated (navigator.webdriver).
  args: ['--disable-blink-features=AutomationControlled', '--no-sandbox', '--disable-dev-shm-usage'],
});
// Headless Chromium names itself HeadlessChrome, which posthog-js (and sluice's bot flag)
// take for a crawler: the page is given the user agent of the same browser with a screen.
const context = await browser.newContext({
  userAgent: `Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/${browser.version()} Safari/537.36`,
});
const tab = await context.newPage();
await context.route('**/*', (route) => {
  const host = new URL(route.request().url()).hostname;
  if (host === '127.0.0.1' || host === 'localhost' || host === '[::1]') return route.continue();
  report.blocked.push(route.request().url());
  return route.abort();
});
tab.on('console', (msg) => {
  if (process.env.SLUICE_BROWSER_DEBUG) console.error(`[page ${msg.type()}] ${msg.text()}`);
  if (msg.type() === 'error' || msg.type() === 'warning') {
    report.console.push({ type: msg.type(), text: msg.text() });
  }
});
tab.on('pageerror', (err) => report.console.push({ type: 'pageerror', text: String(err) }));
tab.on('requestfailed', (req) => report.failed.push({ url: req.url(), error: req.failure()?.errorText }));
tab.on('response', (res) => {
  if (res.status() >= 400) report.http_errors.push({ url: res.url(), status: res.status() });
});

await tab.goto(origin + (process.env.SLUICE_BROWSER_DEBUG ? '/?debug' : '/'));
await tab.evaluate(() => window.sluiceCalls);
const called = await tab.evaluate(() => JSON.parse(localStorage.getItem('sluice-events') || '[]'));
console.log(JSON.stringify({ phase: 'called', origin, events: called }));

const lines = createInterface({ input: process.stdin });
await new Promise((resolve) => lines.once('line', resolve));
// posthog-js's own beacon transport (a base64 form body), as a site sends its last event.
// Sent while the page is up: posthog-js takes no capture from a pagehide handler of the page.
const beaconAnswered = tab.waitForResponse((r) => new URL(r.url()).pathname === '/e/', { timeout: 30000 });
await tab.evaluate(() => posthog.capture('Browser Beacon', {}, { transport: 'sendBeacon' }));
// Leaving while the beacon is in flight would show it as aborted, though the browser sends it.
await beaconAnswered.catch((err) => report.failed.push({ url: '/e/ beacon', error: String(err) }));
// Leaving the page hides it: pagehide sends the beacons.
await tab.goto(origin + '/done');
report.events = await tab.evaluate(() => JSON.parse(localStorage.getItem('sluice-events') || '[]'));
// Beacons are sent by the browser after the page is gone: give them a moment before closing.
await tab.waitForTimeout(1000);
await browser.close();
server.close();
console.log(JSON.stringify(report));
process.exit(0);
