use super::*;

const MS: Duration = Duration::from_millis(1);

fn timing() -> Timing {
    Timing {
        idle_after: 1000 * MS,
        down_after: 800 * MS,
        down_unanswered: 3200 * MS,
        leader_grace: 1600 * MS,
    }
}

fn view(proposals: u64, last_index: u64, caught_up: bool) -> LeaderView {
    LeaderView {
        term: 3,
        last_index: Some(last_index),
        applied: true,
        followers: vec![2, 3],
        lagging: if caught_up { vec![] } else { vec![3] },
        proposals,
    }
}

#[test]
fn a_leader_asks_to_sleep_only_after_idle_time_with_followers_caught_up() {
    let t0 = Instant::now();
    let mut q = Quiescence::new(1, &[1, 2, 3], timing(), t0);
    let g: GroupId = "orders/0".into();
    assert!(!q.observe_leader(&g, &view(5, 10, true), t0));
    assert!(!q.observe_leader(&g, &view(5, 10, true), t0 + 999 * MS));
    // A proposal restarts the idle time.
    assert!(!q.observe_leader(&g, &view(6, 10, true), t0 + 1000 * MS));
    assert!(!q.observe_leader(&g, &view(6, 11, true), t0 + 1500 * MS));
    assert!(!q.observe_leader(&g, &view(6, 11, true), t0 + 2499 * MS));
    assert!(q.observe_leader(&g, &view(6, 11, true), t0 + 2500 * MS));
    // Not while a follower lags.
    assert!(!q.observe_leader(&g, &view(6, 11, false), t0 + 3000 * MS));
}

#[test]
fn a_leader_waits_for_live_followers_only() {
    let t0 = Instant::now();
    let mut q = Quiescence::new(1, &[1, 2, 3], timing(), t0);
    let g: GroupId = "orders/0".into();
    // Follower 3 lags while up: no sleep.
    q.observe_leader(&g, &view(1, 1, false), t0);
    q.heard(2, 7, t0 + 1500 * MS);
    q.heard(3, 7, t0 + 1500 * MS);
    assert!(!q.observe_leader(&g, &view(1, 1, false), t0 + 1600 * MS));
    // Node 3 goes down: it is not waited for.
    q.heard(2, 7, t0 + 2400 * MS);
    q.tick(t0 + 2400 * MS);
    assert_eq!(q.down_peers(), vec![3]);
    assert!(q.observe_leader(&g, &view(1, 1, false), t0 + 2500 * MS));
    q.slept(g.clone(), 1, vec![1, 2, 3]);
    // Back with the same boot: the groups this node leads with it wake to catch it up.
    assert_eq!(q.heard(3, 7, t0 + 2600 * MS), vec![Action::Wake(g)]);

    // Nodes 2 and 3 both silent: node 1 alone is no quorum, so its group does not sleep
    // without the follower that lags (node 2 may be alive and merely too loaded to answer).
    let other: GroupId = "orders/1".into();
    q.observe_leader(&other, &view(1, 1, false), t0 + 2600 * MS);
    q.tick(t0 + 3500 * MS);
    assert_eq!(q.down_peers(), vec![2, 3]);
    assert!(!q.observe_leader(&other, &view(1, 1, false), t0 + 4000 * MS));
    q.heard(2, 7, t0 + 4000 * MS);
    assert!(q.observe_leader(&other, &view(1, 1, true), t0 + 4000 * MS));
}

#[test]
fn a_down_leader_makes_one_chosen_follower_elect_and_the_other_wait() {
    let t0 = Instant::now();
    let groups: Vec<GroupId> = (0..16).map(|p| format!("orders/{p}")).collect();
    // Nodes 2 and 3 follow node 1 in every group.
    let mut on = [2, 3].map(|me| Quiescence::new(me, &[1, 2, 3], timing(), t0));
    for q in &mut on {
        for g in &groups {
            q.slept(g.clone(), 1, vec![1, 2, 3]);
        }
    }
    let mut elected = Vec::new();
    for (i, q) in on.iter_mut().enumerate() {
        let other = [3, 2][i];
        q.heard(other, 1, t0 + 700 * MS);
        let actions = q.tick(t0 + 800 * MS);
        assert!(
            actions.iter().all(|a| matches!(a, Action::Elect(_))),
            "{actions:?}"
        );
        elected.extend(actions);
    }
    // Each group elects exactly once, on one of the two followers, and both followers get
    // some.
    assert_eq!(elected.len(), groups.len());
    let mut named: Vec<GroupId> = elected
        .iter()
        .map(|a| match a {
            Action::Elect(g) | Action::Wake(g) => g.clone(),
        })
        .collect();
    named.sort();
    named.dedup();
    assert_eq!(named.len(), groups.len());
    assert!(on
        .iter()
        .all(|q| q.asleep_count() > 0 && q.asleep_count() < groups.len()));
    // The follower that was not chosen wakes after the grace if no leader woke it.
    let waiting = on[0].asleep_count();
    on[0].heard(3, 1, t0 + 2000 * MS);
    assert!(on[0].tick(t0 + 2399 * MS).is_empty());
    let woken = on[0].tick(t0 + 2400 * MS);
    assert_eq!(woken.len(), waiting);
    assert!(woken.iter().all(|a| matches!(a, Action::Wake(_))));
    assert_eq!(on[0].asleep_count(), 0);
}

#[test]
fn a_restarted_or_returning_peer_wakes_only_what_it_needs() {
    let t0 = Instant::now();
    let mut q = Quiescence::new(1, &[1, 2, 3], timing(), t0);
    q.slept("a/0".into(), 1, vec![1, 2, 3]);
    q.slept("b/0".into(), 1, vec![1, 3, 4]);
    q.slept("c/0".into(), 4, vec![1, 3, 4]);
    assert!(q.heard(2, 100, t0).is_empty(), "first answer is no news");
    assert!(q.heard(2, 100, t0 + 100 * MS).is_empty());
    // Node 2 restarted: every group it belongs to wakes.
    assert_eq!(
        q.heard(2, 101, t0 + 200 * MS),
        vec![Action::Wake("a/0".into())]
    );
    // Node 3 goes silent, then answers with the same boot: back, not restarted. Only the
    // group this node leads with it wakes (to catch it up), not the one node 4 leads.
    q.heard(3, 5, t0 + 200 * MS);
    q.heard(2, 101, t0 + 900 * MS);
    q.tick(t0 + 1000 * MS);
    assert_eq!(q.down_peers(), vec![3]);
    assert_eq!(
        q.heard(3, 5, t0 + 1100 * MS),
        vec![Action::Wake("b/0".into())]
    );
    assert!(q.down_peers().is_empty());
    // A restart of node 3 wakes the group this node leads with it, not the one node 4
    // leads (node 4 wakes that one); a group node 3 led wakes too.
    q.slept("b/0".into(), 1, vec![1, 3, 4]);
    q.slept("d/0".into(), 3, vec![1, 3, 4]);
    let mut woken = q.heard(3, 6, t0 + 1200 * MS);
    woken.sort_by_key(|a| format!("{a:?}"));
    assert_eq!(
        woken,
        vec![Action::Wake("b/0".into()), Action::Wake("d/0".into())]
    );
    assert_eq!(q.asleep_count(), 1, "c/0, led by node 4, sleeps on");
}

#[test]
fn groups_are_scanned_every_quarter_of_the_idle_time() {
    let t0 = Instant::now();
    let mut q = Quiescence::new(1, &[1, 2, 3], timing(), t0);
    assert!(!q.scan_due(t0 + 249 * MS));
    assert!(q.scan_due(t0 + 250 * MS));
    assert!(!q.scan_due(t0 + 400 * MS));
    assert!(q.scan_due(t0 + 500 * MS));
}

#[test]
fn a_sweep_finds_sleeping_groups_left_without_a_leader() {
    let t0 = Instant::now();
    let mut q = Quiescence::new(1, &[1, 2, 3], timing(), t0);
    assert!(!q.sweep_due(t0 + 1599 * MS));
    assert!(q.sweep_due(t0 + 1600 * MS));
    assert!(!q.sweep_due(t0 + 1700 * MS));
    q.slept("a/0".into(), 2, vec![1, 2, 3]);
    q.heard(2, 1, t0 + 1800 * MS);
    assert!(q.tick(t0 + 1900 * MS).is_empty());
    assert_eq!(q.down_peers(), vec![3]);
    // No leader: stranded. A leader that is up, or this node: not.
    assert!(q.stranded(&"a/0".into(), None));
    assert!(!q.stranded(&"a/0".into(), Some(2)));
    assert!(!q.stranded(&"b/0".into(), Some(1)));
    // A leader that is down: the record's own leader is left to the election logic, any
    // other (a record gone stale) is stranded.
    // A record naming the down leader that went to sleep after it went down was never
    // handled: stranded. Once handled (waiting for the chosen follower), not.
    q.slept("c/0".into(), 3, vec![1, 2, 3]);
    assert!(q.stranded(&"c/0".into(), Some(3)));
    assert!(q.stranded(&"a/0".into(), Some(3)));
    q.slept("e/0".into(), 2, vec![1, 2, 3]);
    q.heard(3, 1, t0 + 2000 * MS);
    let chosen_elsewhere = (0..64)
        .map(|i| format!("g/{i}"))
        .find(|g| {
            let mut probe = Quiescence::new(1, &[1, 2, 3], timing(), t0);
            probe.slept(g.clone(), 2, vec![1, 2, 3]);
            probe.heard(3, 1, t0 + 1000 * MS);
            probe.tick(t0 + 1000 * MS).is_empty()
        })
        .expect("some group's chosen follower is node 3");
    q.slept(chosen_elsewhere.clone(), 2, vec![1, 2, 3]);
    assert!(q
        .tick(t0 + 2700 * MS)
        .iter()
        .all(|a| matches!(a, Action::Elect(_))));
    assert_eq!(q.down_peers(), vec![2]);
    assert!(
        !q.stranded(&chosen_elsewhere, Some(2)),
        "waits for node 3's election"
    );
}

#[test]
fn a_proposal_racing_sleep_leaves_the_group_awake() {
    let quiet = Quiet::default();
    let seen = quiet.proposals();
    // Asleep when nothing came in between.
    assert!(quiet.fall_asleep(seen));
    assert!(quiet.is_asleep());
    // A proposal on a follower does not wake it (Raft refuses it anyway).
    assert!(!quiet.note_proposal(|| false));
    assert!(quiet.is_asleep());
    // A proposal wakes it, and says so once.
    assert!(quiet.note_proposal(|| true));
    assert!(!quiet.is_asleep());
    assert!(!quiet.note_proposal(|| true));
    // A proposal counted after the driver read the count: the driver does not sleep.
    let seen = quiet.proposals();
    quiet.note_proposal(|| true);
    assert!(!quiet.fall_asleep(seen));
    assert!(!quiet.is_asleep());
}

#[test]
fn a_leader_back_with_the_same_boot_ends_the_wait_for_a_winner() {
    let t0 = Instant::now();
    let mut q = Quiescence::new(2, &[1, 2, 3], timing(), t0);
    for p in 0..16 {
        q.slept(format!("orders/{p}"), 1, vec![1, 2, 3]);
    }
    q.heard(1, 9, t0 + 100 * MS);
    q.heard(3, 1, t0 + 800 * MS);
    let elected = q.tick(t0 + 900 * MS).len();
    assert!(elected > 0 && elected < 16, "{elected}");
    // Node 1 answers again, not restarted: the waiting followers stay asleep under it.
    assert!(q.heard(1, 9, t0 + 1000 * MS).is_empty());
    q.heard(1, 9, t0 + 2500 * MS);
    q.heard(3, 1, t0 + 2500 * MS);
    assert!(q.tick(t0 + 2600 * MS).is_empty());
    assert_eq!(q.asleep_count(), 16 - elected);
}

/// A group whose election, when its leader goes down, falls to node 1 of live followers [1, 3].
fn group_node_1_elects_in() -> GroupId {
    (0..)
        .map(|p| format!("orders/{p}"))
        .find(|g| ferry_proto::partition_for_key(g.as_bytes(), 2) == 0)
        .expect("a name")
}

/// A sample of what the transport received from a peer.
fn sample(datagrams: u64) -> Option<ferry_net::Received> {
    Some(ferry_net::Received {
        connection: 1,
        datagrams,
    })
}

#[test]
fn a_peer_that_sends_packets_but_does_not_answer_is_down_only_after_down_unanswered() {
    let t0 = Instant::now();
    let mut q = Quiescence::new(1, &[1, 2, 3], timing(), t0);
    let g = group_node_1_elects_in();
    q.slept(g.clone(), 2, vec![1, 2, 3]);
    q.heard(2, 7, t0);
    // Node 2 answers nothing but its packets keep coming: too loaded, not dead. Node 3
    // answers every round.
    let mut at = t0;
    let mut datagrams = 0;
    while at < t0 + 3100 * MS {
        at += 150 * MS;
        datagrams += 3;
        q.received(2, sample(datagrams), at);
        q.heard(3, 7, at);
        let actions = q.tick(at);
        assert!(actions.is_empty(), "{actions:?}");
        assert!(q.down_peers().is_empty(), "at {:?}", at - t0);
    }
    // Unanswering for `down_unanswered`: down, though its packets still come, and the groups
    // it led elect.
    q.received(2, sample(datagrams + 3), t0 + 3200 * MS);
    q.heard(3, 7, t0 + 3200 * MS);
    let actions = q.tick(t0 + 3200 * MS);
    assert_eq!(q.down_peers(), vec![2]);
    assert_eq!(actions, vec![Action::Elect(g)]);
    // Packets alone do not bring it back: an answer does.
    q.received(2, sample(datagrams + 6), t0 + 3300 * MS);
    assert_eq!(q.down_peers(), vec![2]);
    q.heard(2, 7, t0 + 3400 * MS);
    assert!(q.down_peers().is_empty());
}

#[test]
fn a_peer_without_packets_or_answers_is_down_after_down_after() {
    let t0 = Instant::now();
    let mut q = Quiescence::new(1, &[1, 2, 3], timing(), t0);
    q.heard(2, 7, t0);
    q.received(2, sample(10), t0 + 100 * MS);
    // A sample that does not change is no sign of life; nor is no connection.
    q.received(2, sample(10), t0 + 400 * MS);
    q.received(2, None, t0 + 700 * MS);
    q.heard(3, 7, t0 + 800 * MS);
    q.tick(t0 + 899 * MS);
    assert!(q.down_peers().is_empty());
    q.tick(t0 + 900 * MS);
    assert_eq!(q.down_peers(), vec![2]);
}

#[test]
fn a_sleeping_group_elects_only_while_a_quorum_of_its_voters_is_up() {
    let t0 = Instant::now();
    // Three nodes: node 3 is down, then node 2 (which leads g) goes silent too. Node 1 alone
    // is no quorum of g's voters: g neither elects nor wakes, and the sweep leaves it.
    let mut q = Quiescence::new(1, &[1, 2, 3], timing(), t0);
    let g = group_node_1_elects_in();
    q.slept(g.clone(), 2, vec![1, 2, 3]);
    q.heard(2, 7, t0 + 100 * MS);
    assert!(q.tick(t0 + 800 * MS).is_empty());
    assert_eq!(q.down_peers(), vec![3]);
    assert!(q.tick(t0 + 900 * MS).is_empty());
    assert_eq!(q.down_peers(), vec![2, 3]);
    assert!(q.tick(t0 + 5000 * MS).is_empty(), "no wake after the grace");
    assert!(!q.stranded(&g, Some(2)));
    // Node 3 answers again: a quorum is up, and the sweep wakes g to elect.
    q.heard(3, 7, t0 + 5100 * MS);
    assert!(q.stranded(&g, Some(2)));

    // Four nodes, three replicas: nodes 4 and 3 are down; g (on 1, 2, 3, led by 3) still has
    // a quorum (1 and 2) and elects (node 1 is chosen among [1, 2] as among [1, 3]).
    let mut q = Quiescence::new(1, &[1, 2, 3, 4], timing(), t0);
    q.slept(g.clone(), 3, vec![1, 2, 3]);
    q.heard(2, 7, t0 + 700 * MS);
    q.heard(3, 7, t0 + 100 * MS);
    assert!(q.tick(t0 + 800 * MS).is_empty());
    assert_eq!(q.down_peers(), vec![4]);
    q.heard(2, 7, t0 + 900 * MS);
    assert_eq!(q.tick(t0 + 900 * MS), vec![Action::Elect(g)]);
    assert_eq!(q.down_peers(), vec![3, 4]);
}
