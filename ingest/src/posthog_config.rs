//! PostHog's remote-config and feature-flag answers, which switch every PostHog remote
//! feature off: the same for every key, holding nothing of the project.

use serde_json::{json, Value};

/// PostHog's remote config (`/array/<key>/config`) with every remote feature off: no
/// recording, surveys, heatmaps, autocapture, exception or performance capture, site apps or
/// feature flags, so posthog-js asks for nothing else; gzip and base64 bodies are taken.
/// `surveys` is left out rather than `false`: posthog-js 1.449 loads its surveys script
/// (`/static/surveys.js`, which the collector does not serve) for `false` too.
pub fn remote_config(token: &str) -> Value {
    json!({
        "token": token,
        "supportedCompression": ["gzip-js", "base64"],
        "hasFeatureFlags": false,
        "captureDeadClicks": false,
        "capturePerformance": false,
        "autocapture_opt_out": true,
        "autocaptureExceptions": false,
        "analytics": { "endpoint": "/e/" },
        "elementsChainAsString": true,
        "errorTracking": { "autocaptureExceptions": false, "suppressionRules": [] },
        "logs": { "captureConsoleLogs": false },
        "sessionRecording": false,
        "heatmaps": false,
        "conversations": false,
        "productTours": false,
        "defaultIdentifiedOnly": true,
        "siteApps": [],
        "toolbarParams": {},
        "isAuthenticated": false,
    })
}

/// The script form of [`remote_config`] (`/array/<key>/config.js`), as posthog-js's loader
/// expects it: it sets `window._POSTHOG_REMOTE_CONFIG[<key>]`.
pub fn remote_config_js(token: &str) -> String {
    let config = json!({ "config": remote_config(token), "siteApps": [] });
    // The key is written as a JSON string, so no key can break out of the script.
    let key = Value::from(token);
    format!(
        "(function(){{window._POSTHOG_REMOTE_CONFIG=window._POSTHOG_REMOTE_CONFIG||{{}};\
         window._POSTHOG_REMOTE_CONFIG[{key}]={config};}})();\n"
    )
}

/// The answer of `/flags/?v=2` and of the older `/decide/`: no flag is on, nothing failed,
/// and (for `/decide/` readers) the remote config's switches, all off.
pub fn flags() -> Value {
    let mut answer = remote_config("");
    let object = answer.as_object_mut().expect("a JSON object literal");
    object.remove("token");
    for (k, v) in [
        ("flags", json!({})),
        ("featureFlags", json!({})),
        ("featureFlagPayloads", json!({})),
        ("errorsWhileComputingFlags", json!(false)),
        ("quotaLimited", json!([])),
        ("config", json!({ "enable_collect_everything": false })),
    ] {
        object.insert(k.into(), v);
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_config_and_flags_switch_everything_off() {
        let c = remote_config("phc_x");
        for off in [
            "sessionRecording",
            "heatmaps",
            "hasFeatureFlags",
            "capturePerformance",
        ] {
            assert_eq!(c[off], false, "{off}");
        }
        assert_eq!(c["autocapture_opt_out"], true);
        assert!(c.get("surveys").is_none());
        let js = remote_config_js("k\"</script>");
        assert!(js.contains(r#"["k\"</script>"]"#), "{js}");
        let f = flags();
        assert_eq!(f["flags"], json!({}));
        assert_eq!(f["featureFlags"], json!({}));
        assert_eq!(f["errorsWhileComputingFlags"], false);
    }
}
