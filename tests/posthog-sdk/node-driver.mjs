// Drives PostHog's official Node SDK (posthog-node) against a sluice collector, for
// tests/tests/ingest_posthog_sdk.rs. Configured as a PostHog customer would: only `host`
// points elsewhere; paths, bodies, gzip and the key are the SDK's own.
//
//   node node-driver.mjs HOST PROJECT_KEY SCENARIO
//
// Scenarios:
//   calls   one capture, $pageview, $screen, identify, alias and groupIdentify, gzipped (the
//           SDK's default), and one flags request
//   plain   the same calls with the SDK's `disableCompression`
//
// Prints one JSON object: every HTTP request the SDK sent (path, status, content encoding, the
// events of the body with their uuid) and every error. Exits 1 on any error or non-2xx answer.

import { gunzipSync } from 'node:zlib';
import { PostHog } from 'posthog-node';

const [host, apiKey, scenario = 'calls'] = process.argv.slice(2);
if (!host || !apiKey) {
  console.error('usage: node node-driver.mjs HOST PROJECT_KEY [calls|plain]');
  process.exit(2);
}

const report = { scenario, requests: [], errors: [], flags: null };

// The SDK's documented `fetch` option: the SDK's request goes out unchanged, and is recorded.
async function recordingFetch(url, options) {
  const entry = { path: new URL(url).pathname + new URL(url).search, status: null,
    encoding: options.headers?.['Content-Encoding'] ?? null, events: [] };
  report.requests.push(entry);
  try {
    const raw = Buffer.from(options.body ?? '');
    const text = entry.encoding === 'gzip' ? gunzipSync(raw).toString() : raw.toString();
    const body = JSON.parse(text || '{}');
    for (const e of body.batch ?? []) entry.events.push({ event: e.event, uuid: e.uuid });
  } catch (err) {
    report.errors.push({ code: 'unreadable_body', reason: String(err) });
  }
  const res = await fetch(url, options);
  entry.status = res.status;
  if (!res.ok) report.errors.push({ code: 'http_status', reason: `${res.status} ${url}` });
  return res;
}

const client = new PostHog(apiKey, {
  host,
  fetch: recordingFetch,
  flushAt: 20,
  flushInterval: 0,
  disableCompression: scenario === 'plain',
  // A failing collector should fail the test in seconds, not after many backed-off retries.
  fetchRetryCount: 1,
  fetchRetryDelay: 200,
});
client.on('error', (err) => report.errors.push({ code: 'sdk', reason: String(err) }));

client.capture({
  distinctId: 'ph-node-user-1',
  event: 'Node Order Completed',
  properties: { orderId: 'o-7', revenue: 42.5, $current_url: 'https://shop.example/checkout?utm_source=ph-news' },
});
client.capture({ distinctId: 'ph-node-user-1', event: '$pageview',
  properties: { $current_url: 'https://shop.example/pricing', title: 'Pricing' } });
client.capture({ distinctId: 'ph-node-user-1', event: '$screen',
  properties: { $screen_name: 'Node Settings', tab: 'billing' } });
client.identify({ distinctId: 'ph-node-user-1',
  properties: { $set: { name: 'Ada', plan: 'enterprise' }, $set_once: { first_plan: 'free' },
    $anon_distinct_id: 'ph-node-anon-1' } });
client.alias({ distinctId: 'ph-node-user-1', alias: 'ph-node-old-1' });
client.groupIdentify({ groupType: 'company', groupKey: 'ph-company-1',
  properties: { name: 'Initech', employees: 120 } });

try {
  report.flags = await client.getAllFlags('ph-node-user-1');
} catch (err) {
  report.errors.push({ code: 'flags', reason: String(err) });
}
await client.shutdown(30000);
if (report.requests.some((r) => r.status === null)) {
  report.errors.push({ code: 'no_response', reason: 'a request got no response' });
}
console.log(JSON.stringify(report));
process.exit(report.errors.length ? 1 : 0);
