//! Logs written to a pipe or a file carry no terminal colour codes (docs/architecture.md §8.6):
//! tracing-subscriber colours by default wherever its output goes, and log files full of
//! escape codes are hard to read and to search. Runs the real collector binary with stderr
//! to a pipe, against the shared broker and database.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sluice_tests::{bin_path, unique_name, Stack};

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let stack = Stack::get();
    let prefix = format!("{}.", unique_name("logs"));
    let metrics = free_port();
    let mut child = Command::new(bin_path("sluice-ingest").unwrap())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &metrics.to_string(),
        ])
        .args(["--kafka-brokers", &stack.kafka_brokers])
        .args(["--database-url", &stack.database_url])
        .args(["--topic-prefix", &prefix, "--topic-partitions", "1"])
        // Text is the format that colours; NO_COLOR would hide a regression.
        .env("SLUICE_LOG_FORMAT", "text")
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting sluice-ingest");
    let stderr = child.stderr.take().expect("piped stderr");
    let (lines, received) = mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut stderr = BufReader::new(stderr);
        loop {
            let mut line = Vec::new();
            match stderr.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if lines.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });

    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&log).contains("collector listening") {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => log.extend(line),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "sluice-ingest logged no 'collector listening' within 30 s: {}",
                    String::from_utf8_lossy(&log)
                );
            }
        }
    }
    // The SIGTERM handler is installed just after that line; a signal before it would kill
    // the process undrained. Ready comes later (topics created, both probes answered).
    while !ready(metrics) {
        assert!(
            Instant::now() < deadline,
            "sluice-ingest not ready within 30 s: {}",
            String::from_utf8_lossy(&log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let term = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("running kill");
    assert!(term.success(), "kill -TERM failed");
    // The drain's lines come after the signal; the pipe closes when the process exits.
    while let Ok(line) = received.recv_timeout(Duration::from_secs(30)) {
        log.extend(line);
    }
    let status = child.wait().expect("waiting for sluice-ingest");
    reader.join().expect("stderr reader");
    let text = String::from_utf8_lossy(&log);
    assert!(
        status.success(),
        "sluice-ingest exited with {status}: {text}"
    );
    assert!(
        text.contains("SIGTERM received") && text.contains("collector stopped"),
        "the drain was logged to the pipe: {text}"
    );
    let escape = log.iter().position(|b| *b == 0x1b);
    assert!(
        escape.is_none(),
        "a colour code (ESC at byte {escape:?}) in logs written to a pipe: {text:?}"
    );
}

/// A loopback address nothing listens on at the moment.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("binding a free loopback port")
}

/// True when the collector's `/readyz` answers 200.
fn ready(metrics: SocketAddr) -> bool {
    let Ok(mut conn) = TcpStream::connect_timeout(&metrics, Duration::from_secs(1)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(3)));
    let mut answer = String::new();
    conn.write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .and_then(|()| conn.read_to_string(&mut answer))
        .is_ok_and(|_| answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"))
}
