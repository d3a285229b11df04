//! `steelyard demo` end to end, as a user runs it: one process that starts a broker, three
//! relays and two agents as its children, explains the broker's decision, moves data through a
//! tunnel, stops the chosen relay, shows the next decision and the live tunnel resuming on
//! another relay. The test checks the exit status and the output; it kills the demo if it runs
//! longer than two minutes.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn demo_runs_end_to_end_and_fails_over() {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_steelyard"))
        .args(["demo", "--mib", "4"])
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start steelyard demo");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "steelyard demo ran longer than 120 s; output so far:\n{}\n{}",
                out.join().unwrap(),
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    eprintln!("steelyard demo took {:?}", started.elapsed());
    assert!(status.success(), "demo exited with {status}\n{out}\n{err}");

    // The first explained decision: a table with every relay.
    let tables: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("alice -> bob over tcp: relay "))
        .collect();
    assert_eq!(tables.len(), 2, "two explained decisions:\n{out}");
    assert!(out.contains(" # relay "), "{out}");
    for relay in ["fra-1", "vie-1", "nyc-1"] {
        assert!(out.contains(relay), "{relay} missing:\n{out}");
    }
    let winner = |line: &str| {
        line.trim_start_matches("alice -> bob over tcp: relay ")
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    let (first, second) = (winner(tables[0]), winner(tables[1]));
    assert_ne!(
        first, second,
        "the second decision has another winner:\n{out}"
    );

    // The transfer: throughput line and a matching checksum.
    assert!(
        out.lines().any(|l| l.starts_with("throughput: 4.0 MiB in ")
            && l.contains(" MiB/s via relay ")
            && l.ends_with("checksum ok")),
        "{out}"
    );
    let stopped = out
        .lines()
        .find_map(|l| l.strip_prefix("== 3. "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no relay stopped:\n{out}"));
    assert_eq!(stopped, first, "the chosen relay is stopped:\n{out}");
    assert!(
        out.contains(&format!("{first} is rejected: ")),
        "the stopped relay is listed as rejected:\n{out}"
    );
    let resumed = out
        .lines()
        .find_map(|l| l.strip_prefix("the live tunnel resumed on relay "))
        .unwrap_or_else(|| panic!("the live tunnel did not resume:\n{out}"));
    assert!(!resumed.starts_with(&format!("{first} ")), "{out}");
    assert!(resumed.contains("256 KiB echoed intact"), "{out}");
    assert!(
        out.contains(&format!("a new tunnel via relay {second}: ")),
        "{out}"
    );
    assert!(out.contains("demo done"), "{out}");
}

#[test]
fn offline_demo_still_explains_the_scenario() {
    let out = Command::new(env!("CARGO_BIN_EXE_steelyard"))
        .args(["demo", "--offline", "--burst", "50"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("== 1. One decision, explained"), "{text}");
    assert!(text.contains("fra-1"), "{text}");
}
