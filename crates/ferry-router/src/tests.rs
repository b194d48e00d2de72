//! The forwarder and receiver over a simulated link, in virtual time: messages are dropped,
//! duplicated and reordered, and the forwarder restarts from its committed cursor. Whatever
//! happens, the destination holds every wanted event exactly once and in order, and the
//! cursor never passes a wanted event the destination does not hold.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

enum Message {
    Batch(Batch),
    Ack(Ack),
}

struct Link {
    rng: StdRng,
    drop: f64,
    duplicate: f64,
    in_transit: Vec<(Instant, Message)>,
}

impl Link {
    fn send(&mut self, now: Instant, message: Message) {
        if self.rng.gen_bool(self.drop) {
            return;
        }
        let copies = if self.rng.gen_bool(self.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            // 1-80 ms: later messages often overtake earlier ones.
            let at = now + Duration::from_millis(self.rng.gen_range(1..80));
            let copy = match &message {
                Message::Batch(b) => Message::Batch(b.clone()),
                Message::Ack(a) => Message::Ack(*a),
            };
            self.in_transit.push((at, copy));
        }
    }

    fn due(&mut self, now: Instant) -> Vec<Message> {
        let (due, later): (Vec<_>, Vec<_>) =
            self.in_transit.drain(..).partition(|(at, _)| *at <= now);
        self.in_transit = later;
        due.into_iter().map(|(_, m)| m).collect()
    }
}

/// Two of three events are wanted, except in long stretches where none is (no interest),
/// which the forwarder skips without sending.
fn wanted(offset: u64) -> bool {
    !offset.is_multiple_of(3) && (offset / 50) % 3 != 1
}

/// Runs one seeded scenario; returns the destination's log and how often either side
/// restarted.
fn simulate(seed: u64, events: u64) -> (Vec<(u64, Bytes)>, u32) {
    let mut rng = StdRng::seed_from_u64(seed);
    let config = ForwarderConfig {
        window: 3,
        max_batch_events: 7,
        max_batch_bytes: 64,
        retry_after: Duration::from_millis(100),
        max_backoff: Duration::from_millis(800),
    };
    let start = Instant::now();
    let mut link = Link {
        rng: StdRng::seed_from_u64(seed ^ 0x5eed),
        drop: 0.2,
        duplicate: 0.1,
        in_transit: Vec::new(),
    };
    let mut durable_cursor = 0;
    let mut forwarder = Forwarder::new(config, durable_cursor);
    let mut receiver = Receiver::default();
    let mut log: Vec<(u64, Bytes)> = Vec::new();
    let mut available = 0u64; // the source's high watermark
    let mut restarts = 0;

    for step in 0..200_000u64 {
        let now = start + Duration::from_millis(step * 5);
        // The network heals for the last stretch, so the run must finish.
        if step == 20_000 {
            link.drop = 0.0;
            link.duplicate = 0.0;
        }
        // The source grows.
        if available < events && rng.gen_bool(0.3) {
            available = (available + rng.gen_range(1..10)).min(events);
        }
        // The driver reads what the forwarder asks for, in small chunks.
        if forwarder.wants_source() {
            let from = forwarder.read_from();
            let upto = available.min(from + rng.gen_range(1..20));
            let chunk = (from..upto).map(|o| SourceEvent {
                offset: o,
                wanted: wanted(o),
                bytes: Bytes::from(format!("event-{o}")),
            });
            forwarder.handle_source(chunk, upto);
        }
        while let Some(batch) = forwarder.poll_transmit(now) {
            link.send(now, Message::Batch(batch));
        }
        for message in link.due(now) {
            match message {
                Message::Batch(batch) => {
                    let admission = receiver.admit(&batch);
                    log.extend(admission.append.iter().cloned());
                    receiver.commit(&admission);
                    link.send(now, Message::Ack(admission.ack));
                }
                Message::Ack(ack) => forwarder.handle_ack(ack),
            }
        }
        if let Some(cursor) = forwarder.poll_commit() {
            durable_cursor = cursor;
        }
        let held = log.iter().filter(|(o, _)| *o < durable_cursor).count();
        let owed = (0..durable_cursor).filter(|o| wanted(*o)).count();
        assert_eq!(
            held, owed,
            "seed {seed}: cursor {durable_cursor} passed a wanted event the destination lacks"
        );
        // A crash: everything in memory is gone; the committed cursor survives.
        if step < 20_000 && rng.gen_bool(0.005) {
            forwarder = Forwarder::new(config, durable_cursor);
            restarts += 1;
        }
        // The destination restarts: what was on the wire to or from it is gone; what it
        // committed (its position, its log) survives, as Raft keeps it.
        if step < 20_000 && rng.gen_bool(0.003) {
            link.in_transit.clear();
            restarts += 1;
        }
        if durable_cursor == events && available == events {
            return (log, restarts);
        }
    }
    panic!(
        "seed {seed}: no progress: cursor {durable_cursor}, destination at {}, {} events",
        receiver.next, events
    );
}

#[test]
fn every_wanted_event_arrives_once_in_order_despite_drops_duplicates_reordering_and_restarts() {
    let mut restarted = 0;
    for seed in 0..40 {
        let events = 600;
        let (log, restarts) = simulate(seed, events);
        restarted += usize::from(restarts > 0);
        let offsets: Vec<u64> = log.iter().map(|(o, _)| *o).collect();
        let expected: Vec<u64> = (0..events).filter(|o| wanted(*o)).collect();
        assert_eq!(offsets, expected, "seed {seed}");
        for (o, bytes) in &log {
            assert_eq!(bytes, &Bytes::from(format!("event-{o}")), "seed {seed}");
        }
    }
    assert!(
        restarted >= 20,
        "only {restarted} of 40 runs drew a restart"
    );
}

#[test]
fn a_resent_batch_is_identical_and_the_cursor_waits_for_its_acknowledgement() {
    let config = ForwarderConfig {
        window: 2,
        max_batch_events: 2,
        max_batch_bytes: 1024,
        retry_after: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
    };
    let t0 = Instant::now();
    let mut f = Forwarder::new(config, 10);
    let events = (10..16).map(|o| SourceEvent {
        offset: o,
        wanted: o != 11,
        bytes: Bytes::from(vec![o as u8]),
    });
    f.handle_source(events, 16);
    // Two wanted events per batch; event 11 is covered but not carried.
    let first = f.poll_transmit(t0).unwrap();
    assert_eq!((first.from, first.to), (10, 13));
    assert_eq!(
        first.events.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![10, 12]
    );
    let second = f.poll_transmit(t0).unwrap();
    assert_eq!((second.from, second.to), (13, 15));
    assert!(f.poll_transmit(t0).is_none(), "the window is full");
    assert_eq!(f.poll_timeout(), Some(t0 + Duration::from_millis(100)));

    // The destination answers that it still misses the first batch.
    f.handle_ack(Ack::Gap { next: 10 });
    assert_eq!(
        f.poll_transmit(t0).unwrap(),
        first,
        "resent at once, identical"
    );
    assert_eq!(f.poll_commit(), None);
    // Resends are due after the backoff, which doubles.
    assert!(f.poll_transmit(t0 + Duration::from_millis(150)).is_some());
    assert!(f.poll_transmit(t0 + Duration::from_millis(150)).is_none());
    let resent = f.poll_transmit(t0 + Duration::from_millis(400)).unwrap();
    assert_eq!(resent, first);

    f.handle_ack(Ack::Committed { next: 15 });
    assert_eq!(f.poll_commit(), Some(15));
    let third = f.poll_transmit(t0 + Duration::from_millis(400)).unwrap();
    assert_eq!((third.from, third.to), (15, 16));

    // The receiver side: duplicates are dropped, gaps refused, nothing is appended twice.
    let mut r = Receiver { next: 13 };
    let a = r.admit(&first);
    assert!(a.append.is_empty());
    assert_eq!(a.ack, Ack::Committed { next: 13 });
    let a = r.admit(&third);
    assert_eq!(a.ack, Ack::Gap { next: 13 });
    r.commit(&a);
    assert_eq!(r.next, 13);
    let a = r.admit(&second);
    assert_eq!(a.append.len(), 2);
    r.commit(&a);
    assert_eq!(r.next, 15);
}

#[test]
fn a_range_with_nothing_wanted_is_skipped_and_a_restart_bridges_to_the_destination() {
    let config = ForwarderConfig {
        window: 2,
        max_batch_events: 4,
        max_batch_bytes: 1024,
        retry_after: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
    };
    let t0 = Instant::now();
    let source = |range: std::ops::Range<u64>, wanted: bool| {
        range.map(move |o| SourceEvent {
            offset: o,
            wanted,
            bytes: Bytes::from(vec![o as u8]),
        })
    };
    let mut f = Forwarder::new(config, 0);
    // Nothing wanted: nothing is sent, the cursor moves on.
    f.handle_source(source(0..10, false), 10);
    assert!(f.poll_transmit(t0).is_none());
    assert_eq!(f.poll_commit(), Some(10));
    assert_eq!(f.stats().skipped, 10);
    // Wanted events again: the batch starts where the destination is (0), not at 10.
    f.handle_source(source(10..12, true), 12);
    let batch = f.poll_transmit(t0).unwrap();
    assert_eq!((batch.from, batch.to), (0, 12));
    let mut r = Receiver::default();
    let a = r.admit(&batch);
    assert_eq!(a.append.len(), 2);
    r.commit(&a);
    f.handle_ack(a.ack);
    assert_eq!(f.poll_commit(), Some(12));

    // Skip 12..20, commit, then restart: the destination is at 12, the cursor at 20.
    f.handle_source(source(12..20, false), 20);
    assert_eq!(f.poll_commit(), Some(20));
    let mut f = Forwarder::new(config, 20);
    f.handle_source(source(20..22, true), 22);
    let batch = f.poll_transmit(t0).unwrap();
    assert_eq!((batch.from, batch.to), (20, 22));
    let a = r.admit(&batch);
    assert_eq!(a.ack, Ack::Gap { next: 12 });
    f.handle_ack(a.ack);
    let bridge = f.poll_transmit(t0).unwrap();
    assert_eq!((bridge.from, bridge.to, bridge.events.len()), (12, 20, 0));
    let a = r.admit(&bridge);
    r.commit(&a);
    f.handle_ack(a.ack);
    let again = f.poll_transmit(t0).unwrap();
    assert_eq!(again, batch, "the refused batch goes again, identical");
    let a = r.admit(&again);
    assert_eq!(a.append.len(), 2);
    r.commit(&a);
    f.handle_ack(a.ack);
    assert_eq!(f.poll_commit(), Some(22));
    assert_eq!(r.next, 22);
}
