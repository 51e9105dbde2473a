// Drives Segment's official Node SDK (@segment/analytics-node) against a sluice collector,
// for tests/tests/ingest_segment_sdk.rs. The SDK is configured the way a Segment customer
// would: only `host` points elsewhere; the path, auth and body are the SDK's own.
//
//   node driver.mjs HOST WRITE_KEY SCENARIO
//   (or SLUICE_COLLECTOR_HOST, SLUICE_WRITE_KEY, SLUICE_SCENARIO in the environment)
//
// Scenarios:
//   calls     one track, identify, page, screen, group and alias, with fields the test checks
//   batch:N   N track calls, sent by the SDK in batches of at most 20
//   gzip      the `calls` scenario with request bodies gzipped (see gzipClient)
//
// Prints one JSON object on stdout: the calls made (type, messageId the SDK generated), the
// HTTP requests the SDK sent (status, messages per request) and every error. Exits 1 when the
// SDK reported any error, a request was not 2xx, or a call never completed.

import { gzipSync } from 'node:zlib';
import { Analytics } from '@segment/analytics-node';

const [host = process.env.SLUICE_COLLECTOR_HOST, writeKey = process.env.SLUICE_WRITE_KEY,
  scenario = process.env.SLUICE_SCENARIO ?? 'calls'] = process.argv.slice(2);
if (!host || !writeKey) {
  console.error('usage: node driver.mjs HOST WRITE_KEY [calls|batch:N|gzip]');
  process.exit(2);
}

// The Node SDK sends plain JSON and has no compression setting. Its documented `httpClient`
// hook is the way a customer would add gzip, so this scenario exercises the collector's gzip
// path with bodies the SDK built, not the SDK's own transport.
const gzipClient = {
  async makeRequest({ url, method, headers, body, httpRequestTimeout }) {
    return fetch(url, {
      method,
      headers: { ...headers, 'Content-Encoding': 'gzip' },
      body: gzipSync(Buffer.from(body)),
      signal: AbortSignal.timeout(httpRequestTimeout),
    });
  },
};

const batchSize = 20;
const analytics = new Analytics({
  writeKey,
  host,
  flushAt: batchSize,
  // A failing collector should fail the test in seconds, not after ten backed-off retries.
  maxRetries: 2,
  ...(scenario === 'gzip' ? { httpClient: gzipClient } : {}),
});

const report = { scenario, calls: [], requests: [], errors: [] };
analytics.on('error', (err) => {
  report.errors.push({ code: err.code, reason: String(err.reason), messageId: err.ctx?.event?.messageId });
});
analytics.on('http_request', (req) => {
  let messages = null;
  try {
    messages = JSON.parse(req.body).batch.length;
  } catch {
    // A body the SDK built that is not JSON would itself be the finding: recorded as null.
  }
  report.requests.push({ url: req.url, messages, status: null, body: req.body });
});
analytics.on('http_response', (res) => {
  // Batches are sent concurrently: the body tells which request this answers.
  const request = report.requests.find((r) => r.status === null && r.body === res.body);
  if (request) request.status = res.status;
  if (res.status < 200 || res.status >= 300) {
    report.errors.push({ code: 'http_status', reason: `${res.status} ${res.statusText}` });
  }
});

let expected = 0;
// Every call gets a callback, so a call that never completes shows up as missing.
function call(method, params) {
  expected += 1;
  analytics[method](params, (err, ctx) => {
    if (err) report.errors.push({ code: 'callback', reason: String(err), type: method });
    report.calls.push({ type: method, messageId: ctx?.event?.messageId ?? null });
  });
}

function calls() {
  call('track', {
    anonymousId: 'sdk-anon-1',
    event: 'SDK Order Completed',
    properties: { orderId: 'o-42', revenue: 99.5, items: [{ sku: 'sku-1', qty: 2 }] },
    context: { page: { url: 'https://shop.example/checkout?utm_source=sdk-news' } },
  });
  call('identify', {
    userId: 'sdk-user-1',
    anonymousId: 'sdk-anon-1',
    traits: { name: 'Ada', plan: 'enterprise' },
  });
  call('page', {
    anonymousId: 'sdk-anon-1',
    category: 'Docs',
    name: 'SDK Pricing',
    properties: { path: '/pricing', title: 'Pricing' },
  });
  call('screen', {
    userId: 'sdk-user-1',
    name: 'SDK Settings',
    properties: { tab: 'billing' },
  });
  call('group', {
    userId: 'sdk-user-1',
    groupId: 'sdk-group-1',
    traits: { name: 'Initech', employees: 120 },
  });
  call('alias', { userId: 'sdk-user-1', previousId: 'sdk-anon-1' });
}

if (scenario === 'calls' || scenario === 'gzip') {
  calls();
} else if (scenario.startsWith('batch:')) {
  const n = Number(scenario.slice('batch:'.length));
  if (!Number.isInteger(n) || n < 1) {
    console.error(`bad scenario ${scenario}: batch:N needs a positive N`);
    process.exit(2);
  }
  for (let i = 0; i < n; i += 1) {
    call('track', { anonymousId: `sdk-batch-${i % 5}`, event: 'SDK Batched', properties: { seq: i } });
  }
} else {
  console.error(`unknown scenario ${scenario}`);
  process.exit(2);
}

await analytics.closeAndFlush({ timeout: 30000 });
if (report.calls.length !== expected) {
  report.errors.push({ code: 'incomplete', reason: `${report.calls.length} of ${expected} calls completed` });
}
if (report.requests.some((r) => r.status === null)) {
  report.errors.push({ code: 'no_response', reason: 'a request got no response' });
}
for (const r of report.requests) delete r.body;
console.log(JSON.stringify(report));
process.exit(report.errors.length ? 1 : 0);
