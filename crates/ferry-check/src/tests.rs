//! Hand-written histories, each with one kind of violation, and a clean one.

use super::*;

/// A clean run: two producers, keys in order, everything acknowledged and read back, two
/// replicas agreeing, one unknown outcome that was in fact written.
const CLEAN: &str = r#"
{"type":"invoke","process":1,"f":"publish","id":"a1","key":"k1","topic":"t","time_ms":1}
{"type":"invoke","process":1,"f":"publish","id":"a2","key":"k1","topic":"t","time_ms":2}
{"type":"ok","process":1,"f":"publish","id":"a1","topic":"t","partition":0,"offset":0,"time_ms":3}
{"type":"ok","process":1,"f":"publish","id":"a2","topic":"t","partition":0,"offset":1,"time_ms":4}
{"type":"invoke","process":2,"f":"publish","id":"b1","key":"k2","topic":"t","time_ms":5}
{"type":"info","process":2,"f":"publish","id":"b1","time_ms":9}
{"type":"invoke","process":2,"f":"publish","id":"b2","key":"k2","topic":"t","time_ms":10}
{"type":"fail","process":2,"f":"publish","id":"b2","time_ms":11}
{"type":"ok","process":9,"f":"read","topic":"t","partition":0,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"},{"offset":2,"id":"b1"}],"time_ms":20}
{"type":"dump","node":1,"topic":"t","partition":0,"committed":3,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"},{"offset":2,"id":"b1"}]}
{"type":"dump","node":2,"topic":"t","partition":0,"committed":2,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"a2"},{"offset":2,"id":"zz-uncommitted"}]}
"#;

fn run(text: &str) -> Report {
    check(&History::parse(text).unwrap(), &Options::default())
}

fn with(extra: &str) -> Report {
    run(&format!("{CLEAN}\n{extra}"))
}

#[test]
fn a_clean_history_passes() {
    let r = run(CLEAN);
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.table());
    assert_eq!(r.counts.attempted, 4);
    assert_eq!(r.counts.acknowledged, 2);
    assert_eq!(r.counts.failed, 1);
    assert_eq!(r.counts.unknown, 1);
    assert_eq!(r.counts.recovered, 1);
    assert_eq!(
        r.counts.observed, 3,
        "an uncommitted replica tail is not observed"
    );
    assert!(r.table().starts_with("verdict: PASS"));
}

#[test]
fn a_lost_write_is_flagged_with_its_place_in_the_log() {
    let r = with(
        r#"{"type":"invoke","process":1,"f":"publish","id":"a3","key":"k1","topic":"t"}
{"type":"ok","process":1,"f":"publish","id":"a3","topic":"t","partition":0,"offset":3}"#,
    );
    assert_eq!(r.verdict, Verdict::Fail);
    assert_eq!(r.counts.lost, 1);
    assert_eq!(r.lost[0].id, "a3");
    assert_eq!(r.lost[0].at, LostAt::Postfix);
    assert!(r.reasons[0].contains("lost"), "{:?}", r.reasons);

    // A hole among observed offsets is a middle loss.
    let r = run(
        r#"{"type":"invoke","process":1,"f":"publish","id":"x","key":"k","topic":"t"}
{"type":"ok","process":1,"f":"publish","id":"x","topic":"t","partition":0,"offset":5}
{"type":"ok","process":9,"f":"read","topic":"t","partition":0,"events":[{"offset":4,"id":"y"},{"offset":6,"id":"z"}]}"#,
    );
    assert_eq!(r.lost[0].at, LostAt::Middle);
}

#[test]
fn an_unexpected_read_is_flagged() {
    let r = with(
        r#"{"type":"ok","process":9,"f":"read","topic":"t","partition":0,"events":[{"offset":3,"id":"ghost"}]}"#,
    );
    assert_eq!(r.verdict, Verdict::Fail);
    assert_eq!(r.unexpected, vec!["ghost".to_string()]);
}

#[test]
fn a_definitely_failed_publish_that_shows_up_is_flagged() {
    let r = with(
        r#"{"type":"ok","process":9,"f":"read","topic":"t","partition":0,"events":[{"offset":3,"id":"b2"}]}"#,
    );
    assert_eq!(r.verdict, Verdict::Fail);
    assert_eq!(r.failed_but_observed, vec!["b2".to_string()]);
}

#[test]
fn a_duplicate_is_counted_and_fails_only_when_dedupe_was_promised() {
    let dup = r#"{"type":"ok","process":9,"f":"read","topic":"t","partition":0,"events":[{"offset":3,"id":"a2"}]}"#;
    let r = with(dup);
    assert_eq!(r.counts.duplicated, 1);
    assert_eq!(r.duplicated[0].offsets, vec![1, 3]);
    // a2 was acknowledged at 1, which is among where it was seen: no mismatch.
    assert_eq!(r.counts.ack_mismatches, 0);
    assert_eq!(r.verdict, Verdict::Pass, "{}", r.table());
    let strict = check(
        &History::parse(&format!("{CLEAN}\n{dup}")).unwrap(),
        &Options {
            duplicates_fail: true,
        },
    );
    assert_eq!(strict.verdict, Verdict::Fail);

    // Redelivery to a consumer group is counted, never failed.
    let r = with(
        r#"{"type":"ok","process":7,"f":"deliver","group":"g","topic":"t","partition":0,"events":[{"offset":0,"id":"a1"}]}
{"type":"ok","process":8,"f":"deliver","group":"g","topic":"t","partition":0,"events":[{"offset":0,"id":"a1"}]}"#,
    );
    assert_eq!(r.counts.redelivered, 1);
    assert_eq!(r.verdict, Verdict::Pass);

    // A group of the same name in another region is another group.
    let r = with(
        r#"{"type":"ok","process":7,"f":"deliver","region":"a","group":"g","topic":"t","partition":0,"events":[{"offset":0,"id":"a1"}]}
{"type":"ok","process":8,"f":"deliver","region":"b","group":"g","topic":"t","partition":0,"events":[{"offset":0,"id":"a1"}]}"#,
    );
    assert_eq!(r.counts.redelivered, 0);
}

#[test]
fn an_order_violation_is_flagged() {
    let r = run(
        r#"{"type":"invoke","process":1,"f":"publish","id":"first","key":"k","topic":"t"}
{"type":"invoke","process":1,"f":"publish","id":"second","key":"k","topic":"t"}
{"type":"ok","process":1,"f":"publish","id":"first","topic":"t","partition":0,"offset":1}
{"type":"ok","process":1,"f":"publish","id":"second","topic":"t","partition":0,"offset":0}
{"type":"ok","process":9,"f":"read","topic":"t","partition":0,"events":[{"offset":0,"id":"second"},{"offset":1,"id":"first"}]}"#,
    );
    assert_eq!(r.verdict, Verdict::Fail);
    assert_eq!(r.counts.order_violations, 1);
    let v = &r.order_violations[0];
    assert_eq!(v.published_first, ("first".to_string(), 1));
    assert_eq!(v.stored_first, ("second".to_string(), 0));
}

#[test]
fn replica_divergence_in_the_committed_prefix_is_flagged() {
    let r = with(
        r#"{"type":"dump","node":3,"topic":"t","partition":0,"committed":2,"events":[{"offset":0,"id":"a1"},{"offset":1,"id":"b1"}]}"#,
    );
    assert_eq!(r.verdict, Verdict::Fail);
    assert_eq!(r.counts.replica_divergences, 1);
    assert_eq!(r.replica_divergences[0].offset, 1);
}

#[test]
fn reads_that_disagree_and_acks_that_reads_contradict_are_flagged() {
    let r = with(
        r#"{"type":"ok","process":9,"f":"read","topic":"t","partition":0,"events":[{"offset":1,"id":"b1"}]}"#,
    );
    assert_eq!(r.verdict, Verdict::Fail);
    assert_eq!(r.counts.offset_divergences, 1);

    let r = run(
        r#"{"type":"invoke","process":1,"f":"publish","id":"x","key":"k","topic":"t"}
{"type":"ok","process":1,"f":"publish","id":"x","topic":"t","partition":0,"offset":7}
{"type":"ok","process":9,"f":"read","topic":"t","partition":0,"events":[{"offset":3,"id":"x"}]}"#,
    );
    assert_eq!(r.verdict, Verdict::Fail);
    assert_eq!(r.ack_mismatches[0].observed, vec![3]);
}

#[test]
fn an_event_that_never_reaches_a_required_region_is_flagged_and_lag_is_measured() {
    let r = run(
        r#"{"type":"invoke","process":1,"f":"publish","id":"x","key":"k","topic":"t","regions":["b","c"]}
{"type":"ok","process":1,"f":"publish","region":"a","id":"x","topic":"t","partition":0,"offset":0,"time_ms":100}
{"type":"ok","process":9,"f":"read","region":"a","topic":"t","partition":0,"events":[{"offset":0,"id":"x"}],"time_ms":101}
{"type":"ok","process":9,"f":"read","region":"b","topic":"t","partition":0,"events":[{"offset":0,"id":"x"}],"time_ms":180}"#,
    );
    assert_eq!(r.verdict, Verdict::Fail);
    assert_eq!(
        r.unreached,
        vec![Unreached {
            id: "x".into(),
            region: "c".into()
        }]
    );
    assert_eq!(r.forwarding_lag_ms, Some((80, 80)));
}

#[test]
fn malformed_lines_are_refused_naming_the_line() {
    let err = History::parse("{\"type\":\"ok\",\"f\":\"publish\",\"id\":\"a\"}\nnot json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 2"), "{err}");
    let err = History::parse(r#"{"type":"invoke","f":"publish"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 1") && err.contains("\"id\""), "{err}");
    let err = History::parse(r#"{"type":"dump","partition":0}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("node"), "{err}");
}
