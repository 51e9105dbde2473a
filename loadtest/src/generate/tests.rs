//! The generator's unit tests: determinism per seed, the mix, bodies as SDKs send them.

use super::*;
use chrono::TimeZone;

fn at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap()
}

fn config(seed: u64) -> GeneratorConfig {
    GeneratorConfig {
        seed,
        keys: 5,
        visitors_per_tenant: 50,
        batch_size: 1..=30,
        ..GeneratorConfig::default()
    }
}

#[test]
fn the_same_seed_gives_the_same_requests() {
    let mut a = Generator::new(config(7), "r1");
    let mut b = Generator::new(config(7), "r1");
    for _ in 0..500 {
        let (x, y) = (a.next_request(at()), b.next_request(at()));
        assert_eq!(x.body, y.body);
        assert_eq!((x.key_index, x.endpoint), (y.key_index, y.endpoint));
        assert_eq!(x.event_seqs, y.event_seqs);
    }
    let mut c = Generator::new(config(8), "r1");
    let differ = (0..50).any(|_| a.next_request(at()).body != c.next_request(at()).body);
    assert!(differ, "another seed must give other requests");
}

#[test]
fn bodies_are_valid_segment_json_with_unique_message_ids() {
    let mut g = Generator::new(config(3), "run");
    let mut seen = std::collections::HashSet::new();
    let mut endpoints = std::collections::HashSet::new();
    for _ in 0..2000 {
        let req = g.next_request(at());
        endpoints.insert(req.endpoint);
        if req.endpoint == Endpoint::Pixel {
            let q = std::str::from_utf8(&req.body).unwrap();
            assert!(
                q.starts_with(&format!("m={}&a=a_", message_id("run", req.event_seqs[0]))),
                "{q}"
            );
            assert!(seen.insert(message_id("run", req.event_seqs[0])));
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        let msgs: Vec<&serde_json::Value> = match v.get("batch") {
            Some(b) => b.as_array().unwrap().iter().collect(),
            None => vec![&v],
        };
        assert_eq!(msgs.len(), req.messages());
        let mut events = req.event_seqs.iter();
        for m in msgs {
            let id = m["messageId"].as_str().unwrap().to_owned();
            assert!(seen.insert(id.clone()), "duplicate {id}");
            assert!(m["anonymousId"].as_str().unwrap().starts_with("a_"));
            assert!(m["context"]["sessionId"]
                .as_str()
                .unwrap()
                .starts_with("s_"));
            assert_eq!(m["timestamp"], "2026-11-24T12:00:00.000Z");
            match m["type"].as_str().unwrap() {
                "identify" => assert!(m["traits"]["email"]
                    .as_str()
                    .unwrap()
                    .ends_with("@example.com")),
                t => {
                    assert!(t == "page" || t == "track");
                    assert_eq!(id, message_id("run", *events.next().unwrap()));
                }
            }
        }
        assert!(events.next().is_none());
    }
    assert_eq!(
        endpoints.len(),
        5,
        "every endpoint is exercised: {endpoints:?}"
    );
}

#[test]
fn batch_sizes_stay_in_their_range_and_cover_it() {
    let mut g = Generator::new(
        GeneratorConfig {
            batch_size: 10..=30,
            mix: "page=1,track=1".parse().unwrap(),
            ..config(1)
        },
        "r",
    );
    let sizes: Vec<usize> = (0..3000).map(|_| g.next_request(at()).messages()).collect();
    assert!(sizes.iter().all(|n| (10..=30).contains(n)));
    assert_eq!(*sizes.iter().min().unwrap(), 10);
    assert_eq!(*sizes.iter().max().unwrap(), 30);
    let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
    assert!((mean - 20.0).abs() < 0.5, "mean {mean}");
    let mut fixed = Generator::new(
        GeneratorConfig {
            batch_size: 1..=1,
            mix: "track=1".parse().unwrap(),
            ..config(1)
        },
        "r",
    );
    let req = fixed.next_request(at());
    assert_eq!((req.endpoint, req.messages()), (Endpoint::Track, 1));
}

#[test]
fn zipf_gives_the_head_its_share() {
    let z = Zipf::new(100, 1.1);
    let h: f64 = (1..=100).map(|r: i32| f64::from(r).powf(-1.1)).sum();
    assert!((z.probability(0) - 1.0 / h).abs() < 1e-12);
    let mut rng = StdRng::seed_from_u64(5);
    let mut counts = [0usize; 100];
    let n = 200_000;
    for _ in 0..n {
        counts[z.sample(&mut rng)] += 1;
    }
    let share0 = counts[0] as f64 / f64::from(n);
    assert!(
        (share0 - z.probability(0)).abs() < 0.01,
        "rank 0 share {share0}"
    );
    // The head outweighs the tail: rank 1 about 2^1.1 times rank 2.
    let ratio = counts[0] as f64 / counts[1] as f64;
    assert!((ratio - 2f64.powf(1.1)).abs() < 0.15, "ratio {ratio}");
    assert!(counts[99] > 0);
    let uniform = Zipf::new(4, 0.0);
    assert!((0..4).all(|r| (uniform.probability(r) - 0.25).abs() < 1e-12));
}

#[test]
fn tenants_follow_the_zipf_share_in_requests() {
    let mut g = Generator::new(
        GeneratorConfig {
            keys: 10,
            ..config(2)
        },
        "r",
    );
    let mut counts = [0usize; 10];
    for _ in 0..20_000 {
        counts[g.next_request(at()).key_index] += 1;
    }
    assert!(
        counts[0] > counts[1] && counts[1] > counts[4] && counts[4] > counts[9],
        "{counts:?}"
    );
}

#[test]
fn mix_and_batch_size_parse_or_say_how() {
    let m: Mix = "page=2, pixel=1".parse().unwrap();
    assert_eq!((m.page, m.track, m.identify, m.pixel), (2.0, 0.0, 0.0, 1.0));
    assert!("page=x"
        .parse::<Mix>()
        .unwrap_err()
        .to_string()
        .contains("page=50"));
    assert!("identify=1".parse::<Mix>().is_err());
    assert_eq!(parse_batch_size("20").unwrap(), 20..=20);
    assert_eq!(parse_batch_size("5-9").unwrap(), 5..=9);
    assert!(parse_batch_size("0").is_err());
    assert!(parse_batch_size("9-5").is_err());
}
