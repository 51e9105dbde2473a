# Drives PostHog's official Python SDK (posthog-python) against a sluice collector, for
# tests/tests/ingest_posthog_sdk.rs. Configured as a PostHog customer would: only `host`
# points elsewhere; paths, bodies and the key are the SDK's own.
#
#   python python-driver.py HOST PROJECT_KEY SCENARIO      (SCENARIO: gzip | plain)
#
# Sends one capture, $pageview, $screen, set (person properties), alias and group_identify,
# asks for the flags, and prints one JSON object: each call's uuid as the SDK returned it,
# each HTTP request (path, status), and every error. Exits 1 on any error or non-2xx answer.

import json
import sys

from posthog import Posthog
from posthog import request as posthog_request

host, key, scenario = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else "gzip")
report = {"scenario": scenario, "calls": {}, "requests": [], "errors": [], "flags": None}


def record(response, *args, **kwargs):
    # A hook on the SDK's own session: observes its requests, changes nothing.
    report["requests"].append({"path": response.request.path_url, "status": response.status_code,
                               "encoding": response.request.headers.get("Content-Encoding")})
    if response.status_code >= 300:
        report["errors"].append({"code": "http_status", "reason": f"{response.status_code} {response.text}"})


for session in (posthog_request._get_session(), posthog_request._get_flags_session()):
    session.hooks["response"].append(record)

client = Posthog(key, host=host, gzip=(scenario == "gzip"), flush_at=20, flush_interval=0.2,
                 max_retries=1, on_error=lambda err, batch: report["errors"].append(
                     {"code": "sdk", "reason": str(err)}))

calls = report["calls"]
calls["track"] = client.capture("Python Order Completed", distinct_id="ph-py-user-1",
                                properties={"orderId": "o-9", "revenue": 12.5,
                                            "$current_url": "https://shop.example/cart?utm_source=ph-py"})
calls["page"] = client.capture("$pageview", distinct_id="ph-py-user-1",
                               properties={"$current_url": "https://shop.example/docs", "title": "Docs"})
calls["screen"] = client.capture("$screen", distinct_id="ph-py-user-1",
                                 properties={"$screen_name": "Python Settings", "tab": "keys"})
calls["identify"] = client.set(distinct_id="ph-py-user-1", properties={"name": "Grace", "plan": "team"})
calls["alias"] = client.alias(previous_id="ph-py-old-1", distinct_id="ph-py-user-1")
calls["group"] = client.group_identify("company", "ph-py-company-1",
                                       {"name": "Hooli", "employees": 30})
try:
    report["flags"] = client.get_all_flags("ph-py-user-1")
except Exception as err:  # the answer is what the test checks
    report["errors"].append({"code": "flags", "reason": repr(err)})
client.flush()
client.shutdown()
print(json.dumps(report))
sys.exit(1 if report["errors"] else 0)
