//! `steelyard demo --offline` / `--scenario FILE`: the selection engine alone, no processes. It
//! drives the engine over a scenario and prints what it decides and why: one explained decision,
//! a burst of connects inside one report interval and how they spread, then the winner going
//! silent and the next decision.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use steelyard_select::{PeerId, Request, Timestamp};

use super::DemoArgs;
use crate::scenario::Scenario;

/// Runs the engine-only demo.
pub fn run(args: DemoArgs) -> Result<()> {
    let scenario = Scenario::load(args.scenario.as_deref())?;
    let now = Timestamp::from_millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the system clock is before 1970")?
            .as_millis() as u64,
    );
    let mut selector = scenario.selector(now)?;
    let from = args.from.unwrap_or_else(|| scenario.peers[0].name.clone());
    let to = args.to.unwrap_or_else(|| scenario.peers[1].name.clone());
    let request = Request {
        from: PeerId::new(&from),
        to: PeerId::new(&to),
        transport: args.transport,
        current: None,
    };

    let first = selector.decide(&request, now)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&first)?);
        return Ok(());
    }
    println!("== 1. One decision, explained (scores are costs in ms-equivalents; lower wins)\n");
    println!("{first}");

    println!(
        "== 2. A burst of {} connects {from} -> {to} inside one load-report interval\n",
        args.burst
    );
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..args.burst {
        let at = now.plus_ms(u64::from(i));
        match selector.decide(&request, at) {
            Ok(d) => {
                selector.record_assignment(d.winner.as_str(), at)?;
                *counts.entry(d.winner.to_string()).or_default() += 1;
            }
            Err(e) => {
                println!("connect {i}: no relay: {e}");
                break;
            }
        }
    }
    println!("{:<10} {:>9} {:>12}", "relay", "sessions", "utilisation");
    let after = selector.decide(&request, now.plus_ms(u64::from(args.burst)));
    for (relay, n) in &counts {
        let utilisation = after
            .as_ref()
            .ok()
            .and_then(|d| d.rank_of(relay).map(|r| d.ranked[r].load.utilisation));
        let shown = utilisation.map_or("full".to_string(), |u| format!("{:.0} %", u * 100.0));
        println!("{relay:<10} {n:>9} {shown:>12}");
    }
    println!(
        "\nSessions assigned since the relays' last reports count as load, so the burst spreads \
         instead of herding onto the best relay.\n"
    );

    let silent = first.winner.to_string();
    let timeout_ms = selector.policy().freshness.relay_timeout_secs * 1000;
    let later = now.plus_ms(timeout_ms + 1_000);
    println!(
        "== 3. {silent} stops reporting; {}s later the others report again (burst sessions included)\n",
        (timeout_ms + 1_000) / 1000
    );
    selector = scenario.selector(now)?;
    for r in scenario.relays.iter().filter(|r| r.id != silent) {
        let mut load = scenario.load_of(r);
        load.sessions += counts.get(&r.id).copied().unwrap_or(0);
        selector.relay_report(&r.id, load, later)?;
    }
    match selector.decide(&request, later) {
        Ok(d) => println!("{d}"),
        Err(e) => println!("no relay: {e}"),
    }
    Ok(())
}
