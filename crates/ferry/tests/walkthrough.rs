//! The README's cross-region walkthrough, run verbatim against `ferry dev` (three regions of
//! three nodes, edges, on the ports the README names): the lines of its shell block are taken
//! from README.md and run by bash in order, with `ferry` the binary under test (what the
//! README's `alias ferry='cargo run -q --release --'` runs). The first event published must
//! reach `us` once. `ferry bench` lines are skipped (speed is measured, not tested), and the
//! `tail` line, which streams until Ctrl-C, is stopped once it printed the event.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::FERRY;

/// A child started in a process group of its own (see [`in_own_group`]); the whole group
/// is killed and the child reaped when dropped, whatever happened.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

/// Starts `command` as the leader of a new process group (bash and what it runs die together).
fn in_own_group(command: &mut Command) -> Reaped {
    use std::os::unix::process::CommandExt;
    Reaped(command.process_group(0).spawn().expect("spawn"))
}

/// The lines of the first `sh` block after the line starting with `after` in README.md.
fn readme_block(after: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .expect("README.md");
    let mut lines = readme.lines().skip_while(|l| !l.starts_with(after));
    assert!(
        lines.next().is_some(),
        "README has no line starting with {after:?}"
    );
    let mut lines = lines.skip_while(|l| l.trim() != "```sh");
    assert!(lines.next().is_some(), "no sh block after {after:?}");
    lines
        .take_while(|l| l.trim() != "```")
        .map(str::to_string)
        .collect()
}

/// The output lines of `child` as they come, on a channel.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a line containing `needle`, up to `deadline`; answers the lines read.
fn read_until(rx: &mpsc::Receiver<String>, needle: &str, deadline: Duration) -> Vec<String> {
    let until = Instant::now() + deadline;
    let mut seen = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(_) => panic!("no line containing {needle:?} within {deadline:?}; read {seen:?}"),
        }
    }
}

fn bash(dir: &Path, script: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!(
            "set -euo pipefail\nferry() {{ \"{FERRY}\" \"$@\"; }}\n{script}"
        ))
        .current_dir(dir)
        .env("FERRY_LOG", "warn")
        .env_remove("FERRY_SERVERS")
        .env_remove("FERRY_CERTS");
    cmd
}

#[test]
fn the_readme_cross_region_walkthrough_delivers_the_first_event() {
    let block = readme_block("Across regions");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut dev = in_own_group(
        Command::new(FERRY)
            .arg("dev")
            .current_dir(dir.path())
            .env("FERRY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let dev_out = lines_of(&mut dev.0);
    read_until(&dev_out, "Ctrl-C stops the mesh", Duration::from_secs(120));
    // Ready as a user sees it: every region's nodes in gossip.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let out = bash(dir.path(), "FERRY_SERVERS=127.0.0.1:7401 ferry ctl regions")
            .output()
            .expect("bash");
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success()
            && ["eu", "us", "ap"]
                .iter()
                .all(|r| text.matches(&format!(" {r} ")).count() >= 3)
        {
            break;
        }
        assert!(Instant::now() < until, "the mesh did not form: {text}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut script = Vec::new();
    let mut variables = Vec::new();
    let mut tail = None;
    let mut after_tail = Vec::new();
    for line in &block {
        let command = line.split('#').next().unwrap_or("").trim();
        if command.is_empty() || command.contains("ferry bench") {
            continue;
        }
        if !command.contains("ferry ") {
            variables.push(line.clone());
        }
        if command.contains("ferry ctl tail") {
            tail = Some(line.clone());
        } else if tail.is_none() {
            script.push(line.clone());
        } else {
            after_tail.push(line.clone());
        }
    }
    let tail = tail.expect("the walkthrough tails the destination");
    let out = bash(dir.path(), &script.join("\n")).output().expect("bash");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the walkthrough failed: {printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.lines().any(|l| l.starts_with("seen by ")),
        "interest add did not report its reach: {printed}"
    );

    let mut tailing = in_own_group(
        bash(dir.path(), &format!("{}\n{tail}", variables.join("\n")))
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let tailed = lines_of(&mut tailing.0);
    read_until(
        &tailed,
        "subject=payments.captured",
        Duration::from_secs(30),
    );
    drop(tailing);

    // Once: the destination's topic holds one event.
    let out = bash(
        dir.path(),
        &format!(
            "{}\nFERRY_SERVERS=$US ferry ctl topic describe payments",
            variables.join("\n")
        ),
    )
    .output()
    .expect("bash");
    let described = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "describe failed: {described}");
    let held: u64 = described
        .lines()
        .filter_map(|l| l.split("offsets ").nth(1))
        .filter_map(|range| {
            let (low, high) = range.trim().split_once("..")?;
            Some(high.parse::<u64>().ok()? - low.parse::<u64>().ok()?)
        })
        .sum();
    assert_eq!(held, 1, "us holds the event once: {described}");

    let out = bash(
        dir.path(),
        &format!("{}\n{}", variables.join("\n"), after_tail.join("\n")),
    )
    .output()
    .expect("bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let regions = String::from_utf8_lossy(&out.stdout);
    assert!(regions.contains("payments/0 -> us"), "{regions}");
}
