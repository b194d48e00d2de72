//! Hand-written histories: a clean one, and for every rule one that breaks it (each made by
//! editing the clean one, so each differs from a passing history in that one way).

use super::*;

/// A clean run in two regions: process 1 publishes a1, a2 (key k1) in region a, both must
/// reach b; process 2's b1 has an unknown outcome but was written (and forwarded), b2 failed.
/// A mid-run read, a group whose two members saw offsets 0-2 (1 twice), final reads of both
/// regions' logs, two replicas of a's log (one with an uncommitted tail), and one fault held
/// while all four publishes were in flight.
const CLEAN: &str = r#"
{"type":"invoke","process":1,"f":"publish","id":"a1","key":"k1","region":"a","regions":["b"],"topic":"t","time_ms":1}
{"type":"invoke","process":1,"f":"publish","id":"a2","key":"k1","region":"a","regions":["b"],"topic":"t","time_ms":2}
{"type":"ok","process":1,"f":"publish","id":"a1","region":"a","topic":"t","partition":0,"offset":0,"time_ms":3}
{"type":"ok","process":1,"f":"publish","id":"a2","region":"a","topic":"t","partition":0,"offset":1,"time_ms":4}
{"type":"invoke","process":2,"f":"publish","id":"b1","key":"k2","region":"a","regions":["b"],"topic":"t","time_ms":5}
{"type":"info","process":2,"f":"publish","id":"b1","time_ms":9}
{"type":"invoke","process":2,"f":"publish","id":"b2","key":"k2","region":"a","regions":["b"],"topic":"t","time_ms":10}
{"type":"fail","process":2,"f":"publish","id":"b2","time_ms":11}
{"type":"fault","kind":"kill","node":2,"region":"a","time_ms":2,"end_ms":12}
{"type":"ok","process":9,"f":"read","region":"a","topic":"t","partition":0,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"}],"time_ms":20}
{"type":"ok","process":7,"f":"deliver","region":"a","group":"g","topic":"t","partition":0,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"}],"time_ms":21}
{"type":"ok","process":8,"f":"deliver","region":"a","group":"g","topic":"t","partition":0,"events":[{"offset":1,"id":"a2"},{"offset":2,"id":"b1"}],"time_ms":22}
{"type":"ok","f":"read","final":true,"region":"a","topic":"t","partition":0,"partitions":1,"low":0,"high":3,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"},{"offset":2,"id":"b1"}],"time_ms":100}
{"type":"ok","f":"read","final":true,"region":"b","topic":"t","partition":0,"partitions":1,"low":0,"high":3,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"b1"},{"offset":2,"id":"a2"}],"time_ms":160}
{"type":"dump","node":1,"region":"a","topic":"t","partition":0,"committed":3,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"},{"offset":2,"id":"b1"}],"time_ms":110}
{"type":"dump","node":2,"region":"a","topic":"t","partition":0,"committed":3,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"},{"offset":2,"id":"b1"},{"offset":3,"id":"zz-uncommitted"}],"time_ms":111}
"#;

fn run(text: &str) -> Report {
    run_with(text, &Options::default())
}

fn run_with(text: &str, options: &Options) -> Report {
    check(&History::parse(text).unwrap(), options)
}

/// CLEAN with `from` replaced by `to` (which must be there, once).
fn edited(from: &str, to: &str) -> String {
    assert_eq!(CLEAN.matches(from).count(), 1, "{from:?} once in CLEAN");
    CLEAN.replace(from, to)
}

/// CLEAN without the line containing `marker`.
fn without(marker: &str) -> String {
    let lines: Vec<&str> = CLEAN.lines().filter(|l| l.contains(marker)).collect();
    assert_eq!(lines.len(), 1, "{marker:?} on one line of CLEAN");
    CLEAN.replace(lines[0], "")
}

fn fails_for(r: &Report, reason: &str) {
    assert_eq!(r.verdict, Verdict::Fail, "{}", r.table());
    assert!(
        r.reasons.iter().any(|x| x.contains(reason)),
        "expected a reason containing {reason:?}:\n{}",
        r.table()
    );
}

const A_FINAL: &str = r#"{"type":"ok","f":"read","final":true,"region":"a","topic":"t","partition":0,"partitions":1,"low":0,"high":3,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"},{"offset":2,"id":"b1"}],"time_ms":100}"#;
const B_FINAL_EVENTS: &str = r#""events":[{"offset":0,"id":"a1"},{"offset":1,"id":"b1"},{"offset":2,"id":"a2"}],"time_ms":160"#;

#[test]
fn a_clean_history_passes() {
    let r = run(CLEAN);
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.table());
    let c = &r.counts;
    assert_eq!(
        (
            c.attempted,
            c.acknowledged,
            c.failed,
            c.unknown,
            c.recovered
        ),
        (4, 2, 1, 1, 1)
    );
    assert_eq!((c.final_reads, c.final_read_events), (2, 6));
    assert_eq!(
        (c.dumps, c.dumped_events),
        (2, 6),
        "the uncommitted tail is not counted"
    );
    assert_eq!(c.redelivered, 1);
    assert_eq!(
        r.faults,
        vec![("kill".to_string(), 2, 12, 4)],
        "a1 done at 3 counts"
    );
    assert_eq!(r.acknowledged_by_region.get("a"), Some(&2));
    assert_eq!(
        r.forwarding_lag_ms,
        Some((157, 157)),
        "acks at 3 and 4, in b at 160"
    );
    assert!(r.table().starts_with("verdict: PASS"));
}

#[test]
fn a_truncated_origin_log_loses_acknowledged_events_whatever_else_saw_them() {
    // a's log lost its tail after forwarding it: b's copy, the consumer group, the mid-run
    // read and the replica dumps all still hold a2 and b1. None of them may hide the loss.
    let r = run(&edited(
        A_FINAL,
        r#"{"type":"ok","f":"read","final":true,"region":"a","topic":"t","partition":0,"partitions":1,"low":0,"high":1,"events":[{"offset":0,"id":"a1"}],"time_ms":100}"#,
    ));
    fails_for(&r, "acknowledged events lost");
    assert_eq!(r.lost.len(), 1);
    assert_eq!(r.lost[0].id, "a2");
    assert_eq!(r.lost[0].at, LostAt::Postfix);
    assert_eq!(
        r.vanished_at_origin,
        vec!["b1".to_string()],
        "b1 is in b, not in a"
    );
    // The group and the mid-run read saw offsets the final read no longer has.
    assert!(r.offset_divergences.iter().any(|d| d.offset == 2));
    // Replicas hold what the final read lacks.
    assert!(r.counts.replica_divergences > 0, "{}", r.table());
}

#[test]
fn another_event_at_the_acknowledged_offset_is_a_middle_loss() {
    let r = run(&edited(
        r#"{"offset":1,"id":"a2"},{"offset":2,"id":"b1"}],"time_ms":100}"#,
        r#"{"offset":1,"id":"b1"},{"offset":2,"id":"x"}],"time_ms":100}"#,
    ));
    fails_for(&r, "acknowledged events lost");
    assert_eq!(r.lost[0].id, "a2");
    assert_eq!(r.lost[0].at, LostAt::Middle);
    assert_eq!(r.lost[0].found_instead.as_deref(), Some("b1"));
}

#[test]
fn an_acknowledged_event_at_another_offset_is_an_ack_mismatch() {
    let r = run(&edited(
        r#"{"offset":1,"id":"a2"},{"offset":2,"id":"b1"}],"time_ms":100}"#,
        r#"{"offset":1,"id":"b1"},{"offset":2,"id":"a2"}],"time_ms":100}"#,
    ));
    fails_for(&r, "acknowledged offsets contradicted");
    assert_eq!(r.ack_mismatches[0].id, "a2");
    assert_eq!(r.ack_mismatches[0].observed, vec![2]);
    assert_eq!(r.counts.lost, 0);
}

#[test]
fn an_observation_before_the_invoke_proves_nothing_and_fails() {
    let r = run(&format!(
        "{CLEAN}\n{}",
        r#"{"type":"ok","process":9,"f":"read","region":"a","topic":"t","partition":0,"events":[{"offset":0,"id":"a1"}],"time_ms":0}"#
    ));
    fails_for(&r, "before their publish was invoked");
    assert_eq!(r.premature[0].id, "a1");
    assert_eq!(
        (r.premature[0].observed_ms, r.premature[0].invoked_ms),
        (0, 1)
    );
}

#[test]
fn a_history_without_final_reads_fails() {
    let publishes: String = CLEAN
        .lines()
        .filter(|l| l.contains("\"publish\""))
        .collect::<Vec<_>>()
        .join("\n");
    let r = run(&publishes);
    fails_for(&r, "cannot judge");
    assert!(
        r.unjudged.iter().any(|u| u.contains("no final read of it")),
        "{:?}",
        r.unjudged
    );
}

#[test]
fn a_final_read_with_a_hole_or_a_missing_partition_cannot_judge() {
    // A collect that stopped after its first page: the range claims 0..3, the events end at 0.
    let r = run(&edited(
        r#""low":0,"high":3,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"},{"offset":2,"id":"b1"}],"time_ms":100"#,
        r#""low":0,"high":3,"events":[{"offset":0,"id":"a1"}],"time_ms":100"#,
    ));
    fails_for(&r, "cannot judge");
    assert!(
        r.unjudged.iter().any(|u| u.contains("misses 2 offsets")),
        "{:?}",
        r.unjudged
    );

    // The topic has two partitions in b, and only one was read.
    let r = run(&edited(
        r#""region":"b","topic":"t","partition":0,"partitions":1"#,
        r#""region":"b","topic":"t","partition":0,"partitions":2"#,
    ));
    fails_for(&r, "cannot judge");
    assert!(
        r.unjudged.iter().any(|u| u.contains("partitions [1]")),
        "{:?}",
        r.unjudged
    );
}

#[test]
fn a_final_read_made_before_an_acknowledgement_cannot_judge_it() {
    let r = run(&edited(
        r#""id":"b1"}],"time_ms":100}"#,
        r#""id":"b1"}],"time_ms":3}"#,
    ));
    fails_for(&r, "cannot judge");
    assert!(r
        .unjudged
        .iter()
        .any(|u| u.contains("before acknowledgements")));
}

#[test]
fn a_log_start_above_zero_needs_retention_and_then_counts_expired() {
    let trimmed = edited(
        r#""low":0,"high":3,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"},{"offset":2,"id":"b1"}],"time_ms":100"#,
        r#""low":1,"high":3,"events":[{"offset":1,"id":"a2"},{"offset":2,"id":"b1"}],"time_ms":100"#,
    )
    // Replicas and the group start at the new log start too.
    .replace(r#""committed":3,"events":[{"offset":0,"id":"a1"},"#, r#""committed":3,"events":["#)
    .replace(
        r#""partition":0,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"}],"time_ms":21"#,
        r#""partition":0,"events":[{"offset":1,"id":"a2"}],"time_ms":21"#,
    )
    .replace(
        r#""partition":0,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"}],"time_ms":20"#,
        r#""partition":0,"events":[{"offset":1,"id":"a2"}],"time_ms":20"#,
    );
    let r = run(&trimmed);
    fails_for(&r, "cannot judge");
    assert!(
        r.unjudged.iter().any(|u| u.contains("no retention")),
        "{:?}",
        r.unjudged
    );
    let r = run_with(
        &trimmed,
        &Options {
            retention: true,
            ..Options::default()
        },
    );
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.table());
    assert_eq!(r.counts.expired, 1);
}

#[test]
fn a_replica_behind_or_different_from_the_final_read_is_flagged() {
    // Node 1 never caught up past offset 2.
    let r = run(&edited(
        r#""node":1,"region":"a","topic":"t","partition":0,"committed":3,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"},{"offset":2,"id":"b1"}]"#,
        r#""node":1,"region":"a","topic":"t","partition":0,"committed":2,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"}]"#,
    ));
    fails_for(&r, "replicas short");
    assert_eq!(r.replicas_behind[0].node, 1);
    assert_eq!(r.replicas_behind[0].holds, (0, 2));
    assert_eq!(r.replicas_behind[0].wanted, (0, 3));

    // One replica alone holding another event than the final read is a divergence.
    let r = run(&edited(
        r#""node":1,"region":"a","topic":"t","partition":0,"committed":3,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"}"#,
        r#""node":1,"region":"a","topic":"t","partition":0,"committed":3,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"b1"}"#,
    ));
    fails_for(&r, "replicas differ");
    assert_eq!(r.replica_divergences[0].offset, 1);
}

#[test]
fn a_consumer_group_that_skips_offsets_is_flagged() {
    // Member 8 resumed at 2 after member 7 had handled only offset 0.
    let r = run(&edited(
        r#""events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"}],"time_ms":21"#,
        r#""events":[{"offset":0,"id":"a1"}],"time_ms":21"#,
    )
    .replace(
        r#""events":[{"offset":1,"id":"a2"},{"offset":2,"id":"b1"}],"time_ms":22"#,
        r#""events":[{"offset":2,"id":"b1"}],"time_ms":22"#,
    ));
    fails_for(&r, "skipped offsets");
    assert_eq!(r.group_gaps[0].skipped, vec![(1, 2)]);
    assert_eq!(r.group_gaps[0].group, "g");

    // A group that never got the start of the log skipped it too.
    let r = run(&without(r#""process":7"#));
    fails_for(&r, "skipped offsets");
    assert_eq!(r.group_gaps[0].skipped, vec![(0, 1)]);

    // A group that stalled before the last acknowledged offset (a2 at 1) never read the rest.
    let r = run(&without(r#""process":8"#).replace(
        r#""events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"}],"time_ms":21"#,
        r#""events":[{"offset":0,"id":"a1"}],"time_ms":21"#,
    ));
    fails_for(&r, "not read up to the last acknowledged offset");
    assert!(r.group_gaps[0].skipped.is_empty());
    assert_eq!(r.group_gaps[0].unreached, Some((1, 2)));
    assert_eq!((r.counts.group_gaps, r.counts.group_unfinished), (0, 1));

    // A group reading the region's topic must read each of its partitions: a reader that
    // never started on partition 1 never read what was acknowledged there.
    let r = run(&format!(
        "{}\n{}\n{}",
        edited(
            r#""region":"a","topic":"t","partition":0,"partitions":1"#,
            r#""region":"a","topic":"t","partition":0,"partitions":2"#,
        ),
        r#"{"type":"invoke","process":1,"f":"publish","id":"a9","key":"k9","region":"a","topic":"t","time_ms":30}"#,
        r#"{"type":"ok","process":1,"f":"publish","id":"a9","region":"a","topic":"t","partition":1,"offset":0,"time_ms":31}
{"type":"ok","f":"read","final":true,"region":"a","topic":"t","partition":1,"partitions":2,"low":0,"high":1,"events":[{"offset":0,"id":"a9"}],"time_ms":101}"#
    ));
    fails_for(&r, "not read up to the last acknowledged offset");
    assert_eq!(r.group_gaps[0].log.2, 1);
    assert_eq!(r.group_gaps[0].unreached, Some((0, 1)));
}

#[test]
fn writes_of_unknown_outcome_at_their_origin_must_reach_their_regions() {
    // b1's outcome is unknown, but a's log holds it: b must get it too.
    let r = run(&edited(
        B_FINAL_EVENTS,
        r#""events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"}],"time_ms":160"#,
    )
    .replace(
        r#""region":"b","topic":"t","partition":0,"partitions":1,"low":0,"high":3"#,
        r#""region":"b","topic":"t","partition":0,"partitions":1,"low":0,"high":2"#,
    ));
    fails_for(&r, "never reached");
    assert_eq!(
        r.unreached,
        vec![Unreached {
            id: "b1".into(),
            region: "b".into()
        }]
    );

    // An acknowledged event missing in b, and a region with no final read at all.
    let r = run(&edited(
        B_FINAL_EVENTS,
        r#""events":[{"offset":0,"id":"a1"},{"offset":1,"id":"b1"}],"time_ms":160"#,
    )
    .replace(r#""partitions":1,"low":0,"high":3,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"b1"}],"time_ms":160"#, r#""partitions":1,"low":0,"high":2,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"b1"}],"time_ms":160"#));
    fails_for(&r, "never reached");
    assert_eq!(r.unreached[0].id, "a2");
    let r = run(&without(B_FINAL_EVENTS));
    fails_for(&r, "cannot judge");
    assert!(r
        .unjudged
        .iter()
        .any(|u| u.contains("no final read of topic t in region \"b\"")));
}

#[test]
fn floors_fail_a_run_that_proves_too_little() {
    let strict = Options {
        min_acknowledged_per_region: 3,
        min_publishes_per_fault: 5,
        ..Options::default()
    };
    let r = run_with(CLEAN, &strict);
    fails_for(&r, "floors not met");
    assert_eq!(r.below_floor.len(), 2, "{:?}", r.below_floor);
    assert!(r.below_floor[0].contains("2 publishes acknowledged"));
    assert!(r.below_floor[1].contains("4 publishes in flight while it held"));
    // A region whose publishes were all lost to timeouts is floored too.
    let r = run_with(
        &format!(
            "{CLEAN}\n{}",
            r#"{"type":"invoke","process":5,"f":"publish","id":"c1","region":"c","topic":"t","time_ms":40}
{"type":"info","process":5,"f":"publish","id":"c1","time_ms":41}"#
        ),
        &Options {
            min_acknowledged_per_region: 1,
            ..Options::default()
        },
    );
    fails_for(&r, "floors not met");
    assert!(r.below_floor[0].contains("region \"c\": 0 publishes acknowledged"));
    let met = Options {
        min_acknowledged_per_region: 2,
        min_publishes_per_fault: 4,
        ..Options::default()
    };
    assert_eq!(run_with(CLEAN, &met).verdict, Verdict::Pass);
    // A fault held while nothing was published.
    let r = run_with(
        &edited(r#""time_ms":2,"end_ms":12"#, r#""time_ms":50,"end_ms":60"#),
        &Options {
            min_publishes_per_fault: 1,
            ..Options::default()
        },
    );
    fails_for(&r, "floors not met");
}

#[test]
fn an_unexpected_event_is_flagged() {
    let r = run(&format!(
        "{CLEAN}\n{}",
        r#"{"type":"ok","process":9,"f":"read","region":"a","topic":"t","partition":0,"events":[{"offset":3,"id":"ghost"}],"time_ms":30}"#
    ));
    fails_for(&r, "never published");
    assert_eq!(r.unexpected, vec!["ghost".to_string()]);
}

#[test]
fn a_definitely_failed_publish_that_shows_up_is_flagged() {
    let r = run(&edited(
        r#"{"offset":0,"id":"a1"},{"offset":1,"id":"b1"},{"offset":2,"id":"a2"}],"time_ms":160"#,
        r#"{"offset":0,"id":"a1"},{"offset":1,"id":"b1"},{"offset":2,"id":"a2"},{"offset":3,"id":"b2"}],"time_ms":160"#,
    )
    .replace(r#""region":"b","topic":"t","partition":0,"partitions":1,"low":0,"high":3"#, r#""region":"b","topic":"t","partition":0,"partitions":1,"low":0,"high":4"#));
    fails_for(&r, "after a definite failure");
    assert_eq!(r.failed_but_observed, vec!["b2".to_string()]);
}

#[test]
fn a_duplicate_is_counted_and_fails_only_when_dedupe_was_promised() {
    let dup = edited(
        B_FINAL_EVENTS,
        r#""events":[{"offset":0,"id":"a1"},{"offset":1,"id":"b1"},{"offset":2,"id":"a2"},{"offset":3,"id":"a1"}],"time_ms":160"#,
    )
    .replace(r#""region":"b","topic":"t","partition":0,"partitions":1,"low":0,"high":3"#, r#""region":"b","topic":"t","partition":0,"partitions":1,"low":0,"high":4"#);
    let r = run(&dup);
    assert_eq!(r.counts.duplicated, 1);
    assert_eq!(r.duplicated[0].copies, vec![(0, 0), (0, 3)]);
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.table());
    let strict = run_with(
        &dup,
        &Options {
            duplicates_fail: true,
            ..Options::default()
        },
    );
    fails_for(&strict, "two offsets of one log");
}

#[test]
fn an_event_in_two_partitions_of_one_region_is_a_duplicate() {
    // b holds a1 in partition 0 and again in partition 1 of its topic.
    let two = edited(
        r#""region":"b","topic":"t","partition":0,"partitions":1"#,
        r#""region":"b","topic":"t","partition":0,"partitions":2"#,
    );
    let r = run_with(
        &format!(
            "{two}\n{}",
            r#"{"type":"ok","f":"read","final":true,"region":"b","topic":"t","partition":1,"partitions":2,"low":0,"high":1,"events":[{"offset":0,"id":"a1"}],"time_ms":161}"#
        ),
        &Options {
            duplicates_fail: true,
            ..Options::default()
        },
    );
    fails_for(&r, "two offsets of one log");
    assert_eq!(r.duplicated[0].copies, vec![(0, 0), (1, 0)]);
}

#[test]
fn an_order_violation_is_flagged() {
    // b received a2 before a1 (both of process 1, key k1).
    let r = run(&edited(
        B_FINAL_EVENTS,
        r#""events":[{"offset":0,"id":"a2"},{"offset":1,"id":"b1"},{"offset":2,"id":"a1"}],"time_ms":160"#,
    ));
    fails_for(&r, "order violations");
    let v = &r.order_violations[0];
    assert_eq!(v.log.0, "b");
    assert_eq!(v.published_first, ("a1".to_string(), 2));
    assert_eq!(v.stored_first, ("a2".to_string(), 0));
}

#[test]
fn a_mid_run_read_that_the_final_read_contradicts_is_flagged() {
    let r = run(&format!(
        "{CLEAN}\n{}",
        r#"{"type":"ok","process":9,"f":"read","region":"a","topic":"t","partition":0,"events":[{"offset":1,"id":"b1"}],"time_ms":30}"#
    ));
    fails_for(&r, "offsets observed with events");
    assert_eq!(r.offset_divergences[0].offset, 1);
}

#[test]
fn lines_out_of_order_or_with_unknown_fields_are_refused_naming_the_line() {
    let refused = |text: &str, line: usize, words: &str| {
        let err = History::parse(text).unwrap_err().to_string();
        assert!(err.contains(&format!("line {line}")), "{err}");
        assert!(err.contains(words), "{err}");
    };
    let invoke = r#"{"type":"invoke","process":1,"f":"publish","id":"a","topic":"t","time_ms":1}"#;
    let ok = r#"{"type":"ok","process":1,"f":"publish","id":"a","topic":"t","partition":0,"offset":0,"time_ms":1}"#;
    refused(&format!("{invoke}\n{ok}\n{invoke}"), 3, "invoked again");
    refused(ok, 1, "before it is invoked");
    refused(&format!("{invoke}\n{ok}\n{ok}"), 3, "completes again");
    refused(
        &format!("{invoke}\n{}", ok.replace(",\"partition\":0", "")),
        2,
        "\"partition\"",
    );
    // An acknowledgement without an offset (a resend older than the dedupe window) is not.
    History::parse(&format!("{invoke}\n{}", ok.replace(",\"offset\":0", ""))).unwrap();
    refused(
        &invoke.replace("\"topic\"", "\"topik\""),
        1,
        "unknown field",
    );
    refused(
        r#"{"type":"ok","f":"read","region":"a","topic":"t","partition":0,"events":[{"offset":0,"id":"a","extra":1}],"time_ms":1}"#,
        1,
        "unknown field",
    );
    refused(&format!("\n{A_FINAL}\n{A_FINAL}"), 3, "second final read");
    refused(
        r#"{"type":"ok","f":"read","final":true,"topic":"t","partition":0,"partitions":1,"low":0,"high":1,"events":[{"offset":1,"id":"a"}],"time_ms":1}"#,
        1,
        "outside the final read's range",
    );
    refused(
        r#"{"type":"ok","f":"read","final":true,"topic":"t","partition":0,"low":0,"high":1,"time_ms":1}"#,
        1,
        "\"partitions\"",
    );
    refused(
        "{\"type\":\"ok\",\"f\":\"read\",\"topic\":\"t\",\"partition\":0,\"time_ms\":1}\nnot json",
        2,
        "expected",
    );
    refused(
        r#"{"type":"dump","partition":0,"committed":1,"time_ms":1}"#,
        1,
        "node",
    );
    refused(
        r#"{"type":"dump","node":1,"partition":0,"committed":1,"time_ms":1}"#,
        1,
        "\"topic\"",
    );
    refused(&invoke.replace(",\"time_ms\":1", ""), 1, "time_ms");
    refused(&invoke.replace("\"topic\":\"t\",", ""), 1, "\"topic\"");
    refused(
        r#"{"type":"fault","kind":"kill","time_ms":5,"end_ms":4}"#,
        1,
        "before it starts",
    );
    refused(
        r#"{"type":"invoke","f":"read","topic":"t","partition":0,"time_ms":1}"#,
        1,
        "only completed",
    );
}

#[test]
fn an_acknowledgement_without_an_offset_is_judged_by_id_anywhere_in_the_final_read() {
    // a2 acknowledged through a sidecar: no offset. Held (at offset 1): clean.
    let held = edited(
        r#""id":"a2","region":"a","topic":"t","partition":0,"offset":1,"time_ms":4"#,
        r#""id":"a2","region":"a","topic":"t","partition":0,"time_ms":4"#,
    );
    let r = run(&held);
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.table());
    // Nowhere in a's final read (the log ends at a1): lost, with no place to name.
    let gone = held.replace(
        A_FINAL,
        r#"{"type":"ok","f":"read","final":true,"region":"a","topic":"t","partition":0,"partitions":1,"low":0,"high":1,"events":[{"offset":0,"id":"a1"}],"time_ms":100}"#,
    );
    let r = run(&gone);
    fails_for(&r, "acknowledged events lost");
    assert_eq!(r.lost.len(), 1);
    assert_eq!(
        (r.lost[0].id.as_str(), r.lost[0].at),
        ("a2", LostAt::Unplaced)
    );
    assert_eq!(r.counts.lost_unplaced, 1);
}

/// An edge's client (process 5) on channel user.1: two notifications, a power loss of the
/// edge (a gap: the client's position is from the old epoch), the retained window again
/// under the new epoch, then the third.
const NOTIFY: &str = r#"
{"type":"invoke","process":1,"f":"publish","id":"n1","key":"user.1","region":"a","topic":"n","time_ms":1}
{"type":"ok","process":1,"f":"publish","id":"n1","region":"a","topic":"n","partition":0,"offset":0,"time_ms":2}
{"type":"invoke","process":1,"f":"publish","id":"n2","key":"user.1","region":"a","topic":"n","time_ms":3}
{"type":"ok","process":1,"f":"publish","id":"n2","region":"a","topic":"n","partition":0,"offset":1,"time_ms":4}
{"type":"ok","process":5,"f":"notify","region":"a","topic":"n","channel":"user.1","position":"e1-1","id":"n1","time_ms":5}
{"type":"ok","process":5,"f":"notify","region":"a","topic":"n","channel":"user.1","position":"e1-2","id":"n2","time_ms":6}
{"type":"info","process":5,"f":"notify","region":"a","topic":"n","channel":"user.1","kind":"gap","position":"e2-1","time_ms":7}
{"type":"ok","process":5,"f":"notify","region":"a","topic":"n","channel":"user.1","position":"e2-1","id":"n1","time_ms":8}
{"type":"invoke","process":1,"f":"publish","id":"n3","key":"user.1","region":"a","topic":"n","time_ms":9}
{"type":"ok","process":1,"f":"publish","id":"n3","region":"a","topic":"n","partition":0,"offset":2,"time_ms":10}
{"type":"ok","process":5,"f":"notify","region":"a","topic":"n","channel":"user.1","position":"e2-2","id":"n2","time_ms":11}
{"type":"ok","process":5,"f":"notify","region":"a","topic":"n","channel":"user.1","position":"e2-3","id":"n3","time_ms":12}
{"type":"ok","f":"read","final":true,"region":"a","topic":"n","partition":0,"partitions":1,"low":0,"high":3,"events":[{"offset":0,"id":"n1"},{"offset":1,"id":"n2"},{"offset":2,"id":"n3"}],"time_ms":100}
"#;

fn notify_edited(from: &str, to: &str) -> Report {
    assert_eq!(NOTIFY.matches(from).count(), 1, "{from:?} once in NOTIFY");
    run(&NOTIFY.replace(from, to))
}

#[test]
fn notifications_resumed_across_a_gap_pass() {
    let r = run(NOTIFY);
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.table());
    assert_eq!((r.counts.notified, r.counts.notify_breaks), (5, 1));
}

#[test]
fn a_notification_stream_that_skips_or_changes_epoch_without_a_gap_fails() {
    // e1-1 then e1-3: e1-2 skipped silently.
    let r = notify_edited(
        r#""position":"e1-2","id":"n2""#,
        r#""position":"e1-3","id":"n2""#,
    );
    fails_for(&r, "skipped or renumbered without a gap");
    assert!(
        r.notify_skips[0].contains("e1-2 was due, e1-3 came"),
        "{:?}",
        r.notify_skips
    );
    // Back to an earlier position of the epoch with no break.
    let r = notify_edited(
        r#""position":"e1-2","id":"n2""#,
        r#""position":"e1-1","id":"n2""#,
    );
    fails_for(&r, "skipped or renumbered without a gap");
    // The new epoch without the gap frame before it.
    let gap = NOTIFY
        .lines()
        .find(|l| l.contains(r#""kind":"gap""#))
        .unwrap();
    let r = run(&NOTIFY.replace(gap, ""));
    fails_for(&r, "skipped or renumbered without a gap");
    // A gap that names another position than the one that follows.
    let r = notify_edited(
        r#""kind":"gap","position":"e2-1""#,
        r#""kind":"gap","position":"e2-2""#,
    );
    fails_for(&r, "skipped or renumbered without a gap");
    // A lag resumes after its position, in the same epoch: a lag cannot change the epoch...
    let r = notify_edited(r#""kind":"gap""#, r#""kind":"lag""#);
    fails_for(&r, "skipped or renumbered without a gap");
    // ...and from e1-1 it resumes at e1-2.
    let lagged = NOTIFY.replace(
        r#"{"type":"info","process":5,"f":"notify","region":"a","topic":"n","channel":"user.1","kind":"gap","position":"e2-1","time_ms":7}
{"type":"ok","process":5,"f":"notify","region":"a","topic":"n","channel":"user.1","position":"e2-1","id":"n1","time_ms":8}"#,
        r#"{"type":"info","process":5,"f":"notify","region":"a","topic":"n","channel":"user.1","kind":"lag","position":"e1-1","time_ms":7}
{"type":"ok","process":5,"f":"notify","region":"a","topic":"n","channel":"user.1","position":"e1-2","id":"n2","time_ms":8}
{"type":"info","process":5,"f":"notify","region":"a","topic":"n","channel":"user.1","kind":"gap","position":"e2-2","time_ms":8}"#,
    );
    assert_ne!(lagged, NOTIFY);
    let r = run(&lagged);
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.table());
}

#[test]
fn a_position_naming_two_events_fails() {
    let r = notify_edited(
        r#""position":"e2-2","id":"n2""#,
        r#""position":"e2-1","id":"n2""#,
    );
    fails_for(&r, "positions naming two events");
}

#[test]
fn an_acknowledged_notification_never_received_fails() {
    let line = NOTIFY
        .lines()
        .find(|l| l.contains(r#""position":"e2-3""#))
        .unwrap();
    let r = run(&NOTIFY.replace(line, ""));
    fails_for(&r, "a subscriber never received");
    assert_eq!(r.notify_undelivered, ["n3 on user.1 to process 5"]);
    // One never published is unexpected.
    let r = notify_edited(
        r#""position":"e2-3","id":"n3""#,
        r#""position":"e2-3","id":"zz""#,
    );
    fails_for(&r, "never published");
}

#[test]
fn malformed_notification_lines_are_refused() {
    for (from, to, reason) in [
        (r#""position":"e1-1","#, r#""position":"e1x","#, "position"),
        (
            r#""channel":"user.1","position":"e1-1""#,
            r#""position":"e1-1""#,
            "channel",
        ),
        (r#""kind":"gap""#, r#""kind":"pause""#, "gap or lag"),
        (
            r#""kind":"gap","position":"e2-1""#,
            r#""kind":"gap""#,
            "where it resumes",
        ),
    ] {
        let text = NOTIFY.replace(from, to);
        assert_ne!(text, NOTIFY, "{from:?}");
        let e = History::parse(&text).unwrap_err().to_string();
        assert!(e.contains(reason), "{e}");
    }
}

/// Region s: process 5 publishes k1's s1..s4; partition 0 split into 1 at offset 2; s1, s2 in
/// the parent below the seal, s3, s4 in the child; a group hands them out in order.
const SPLIT: &str = r#"
{"type":"invoke","process":5,"f":"publish","id":"s1","key":"k1","region":"s","topic":"u","time_ms":1}
{"type":"ok","process":5,"f":"publish","id":"s1","region":"s","topic":"u","partition":0,"offset":0,"time_ms":2}
{"type":"invoke","process":5,"f":"publish","id":"s2","key":"k1","region":"s","topic":"u","time_ms":3}
{"type":"ok","process":5,"f":"publish","id":"s2","region":"s","topic":"u","partition":0,"offset":1,"time_ms":4}
{"type":"ok","f":"split","region":"s","topic":"u","partition":1,"parent":0,"offset":2,"time_ms":5}
{"type":"invoke","process":5,"f":"publish","id":"s3","key":"k1","region":"s","topic":"u","time_ms":6}
{"type":"ok","process":5,"f":"publish","id":"s3","region":"s","topic":"u","partition":1,"offset":0,"time_ms":7}
{"type":"invoke","process":5,"f":"publish","id":"s4","key":"k1","region":"s","topic":"u","time_ms":8}
{"type":"ok","process":5,"f":"publish","id":"s4","region":"s","topic":"u","partition":1,"offset":1,"time_ms":9}
{"type":"ok","process":7,"f":"deliver","region":"s","group":"g","topic":"u","partition":0,"events":[{"offset":0,"id":"s1"},{"offset":1,"id":"s2"}],"time_ms":20}
{"type":"ok","process":7,"f":"deliver","region":"s","group":"g","topic":"u","partition":1,"events":[{"offset":0,"id":"s3"},{"offset":1,"id":"s4"}],"time_ms":21}
{"type":"ok","process":8,"f":"deliver","region":"s","group":"g","topic":"u","partition":0,"events":[{"offset":1,"id":"s2"}],"time_ms":22}
{"type":"ok","f":"read","final":true,"region":"s","topic":"u","partition":0,"partitions":2,"low":0,"high":2,"events":[{"offset":0,"id":"s1"},{"offset":1,"id":"s2"}],"time_ms":100}
{"type":"ok","f":"read","final":true,"region":"s","topic":"u","partition":1,"partitions":2,"low":0,"high":2,"events":[{"offset":0,"id":"s3"},{"offset":1,"id":"s4"}],"time_ms":101}
"#;

#[test]
fn a_split_keeps_each_keys_order_across_parent_and_child_in_logs_and_groups() {
    let r = run(SPLIT);
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.table());
    // The parent holds a moved key's event at or past the seal.
    let past = SPLIT.replace(
        r#""partition":1,"parent":0,"offset":2"#,
        r#""partition":1,"parent":0,"offset":1"#,
    );
    let r = run(&past);
    fails_for(&r, "order violations");
    assert_eq!(r.order_violations[0].stored_first, ("s2".to_string(), 1));
    // The child holds an event published before one that stayed in the parent.
    let swapped = SPLIT
        .replace(r#""id":"s2","region":"s","topic":"u","partition":0,"offset":1"#, r#""id":"s2","region":"s","topic":"u","partition":1,"offset":0"#)
        .replace(r#""id":"s3","region":"s","topic":"u","partition":1,"offset":0"#, r#""id":"s3","region":"s","topic":"u","partition":0,"offset":1"#)
        .replace(
            r#""partition":0,"partitions":2,"low":0,"high":2,"events":[{"offset":0,"id":"s1"},{"offset":1,"id":"s2"}]"#,
            r#""partition":0,"partitions":2,"low":0,"high":2,"events":[{"offset":0,"id":"s1"},{"offset":1,"id":"s3"}]"#,
        )
        .replace(
            r#""partition":1,"partitions":2,"low":0,"high":2,"events":[{"offset":0,"id":"s3"},{"offset":1,"id":"s4"}]"#,
            r#""partition":1,"partitions":2,"low":0,"high":2,"events":[{"offset":0,"id":"s2"},{"offset":1,"id":"s4"}]"#,
        );
    let r = run(&swapped);
    fails_for(&r, "order violations");
    // A group that hands the child's events out before the parent's.
    let early = SPLIT.replace(
        r#""partition":1,"events":[{"offset":0,"id":"s3"},{"offset":1,"id":"s4"}],"time_ms":21"#,
        r#""partition":1,"events":[{"offset":0,"id":"s3"},{"offset":1,"id":"s4"}],"time_ms":19"#,
    );
    let lines: Vec<&str> = early.lines().collect();
    let (parent, child) = (
        lines
            .iter()
            .position(|l| l.contains(r#""time_ms":20"#))
            .unwrap(),
        lines
            .iter()
            .position(|l| l.contains(r#""time_ms":19"#))
            .unwrap(),
    );
    let mut reordered = lines.clone();
    reordered.swap(parent, child);
    let r = run(&reordered.join("\n"));
    fails_for(&r, "order violations");
    assert_eq!(r.order_violations[0].published_first.0, "s1");
    // A split line without its parent is refused, naming what it needs.
    let e = History::parse(r#"{"type":"ok","f":"split","region":"s","topic":"u","partition":1,"offset":2,"time_ms":5}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("parent"), "{e}");
}
