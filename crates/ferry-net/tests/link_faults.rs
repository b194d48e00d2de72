//! Faults a shaped link injects into calls — requests lost, replies lost, requests delivered
//! twice — checked the same way on both transports: real QUIC on loopback and the in-memory
//! network. A handler that counts its runs tells what reached the peer; the fault counters
//! tell what was injected.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use ferry_net::tls::{self, dev_ca};
use ferry_net::{
    InjectedFaults, LinkFaults, LinkShape, MemNetwork, NetError, NodeId, QuicTransport, Transport,
    TransportOptions, ALPN_PEER,
};
use tokio::time::{timeout, Instant};

/// The deadline of one call in these tests: a dropped request or reply fails after it.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);
/// The deadline for the test of many calls: a dropped call waits it out, and a plain call on
/// a loaded machine must still make it.
const MIXED_TIMEOUT: Duration = Duration::from_millis(500);
const PEER: NodeId = 2;

/// A transport of node 1 and what it calls: node 2, answering with a counting echo.
struct Link<T> {
    transport: T,
    faults: LinkFaults,
    peer_addr: SocketAddr,
    handler: Arc<Echo>,
    /// Keeps the QUIC peer serving.
    _server: Option<Node>,
}

fn options(faults: &LinkFaults, request_timeout: Duration) -> TransportOptions {
    TransportOptions {
        request_timeout,
        faults: faults.clone(),
        ..TransportOptions::default()
    }
}

fn quic_link(seed: u64, request_timeout: Duration) -> Link<QuicTransport> {
    let ca = dev_ca().unwrap();
    let (id1, id2) = (ca.issue_node(1).unwrap(), ca.issue_node(PEER).unwrap());
    let handler = Echo::new(b"n2:");
    let server = start_echo_node(&id2, handler.clone());
    let faults = LinkFaults::with_seed(seed);
    let transport = QuicTransport::new(
        1,
        client_endpoint(),
        tls::client_config(&id1, ALPN_PEER).unwrap(),
        HashMap::from([(PEER, server.addr)]),
        options(&faults, request_timeout),
    );
    Link {
        transport,
        faults,
        peer_addr: server.addr,
        handler,
        _server: Some(server),
    }
}

fn mem_link(seed: u64, request_timeout: Duration) -> Link<ferry_net::MemTransport> {
    let net = MemNetwork::new();
    let handler = Echo::new(b"n2:");
    net.register(PEER, handler.clone());
    let peer_addr: SocketAddr = "127.0.0.1:7002".parse().unwrap();
    net.set_address(PEER, peer_addr);
    let faults = LinkFaults::with_seed(seed);
    Link {
        transport: net.transport_with(1, options(&faults, request_timeout)),
        faults,
        peer_addr,
        handler,
        _server: None,
    }
}

/// Waits until `check` holds, or fails naming `what`.
async fn wait_for(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn request(n: u32) -> Bytes {
    Bytes::from(format!("request {n}"))
}

/// Runs every fault on `link`, in turn.
async fn faults_on<T: Transport>(link: Link<T>) {
    let Link {
        transport,
        faults,
        peer_addr,
        handler,
        ..
    } = link;
    let call = |n: u32| {
        let transport = transport.clone();
        async move { timeout(DEADLINE, transport.call(PEER, request(n))).await }
    };

    // Unshaped, and shaped with delays but no faults: every call is delivered once.
    for n in 0..20 {
        assert_eq!(
            call(n).await.unwrap().unwrap(),
            echo_reply(1, b"n2:", &request(n))
        );
    }
    faults.shape(
        peer_addr,
        LinkShape {
            delay: Duration::from_millis(1),
            jitter: Duration::from_millis(2),
            loss: 0.5,
            ..LinkShape::default()
        },
    );
    for n in 20..60 {
        assert_eq!(
            call(n).await.unwrap().unwrap(),
            echo_reply(1, b"n2:", &request(n))
        );
    }
    assert_eq!(handler.count(), 60, "each call ran the handler once");
    assert_eq!(
        faults.injected(),
        InjectedFaults::default(),
        "a shape without faults"
    );

    // A lost request: the handler never runs, the caller times out at the call's deadline.
    faults.shape(
        peer_addr,
        LinkShape {
            drop_request: 1.0,
            ..LinkShape::default()
        },
    );
    let started = Instant::now();
    let err = call(60).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, NetError::Timeout { what, .. } if what.contains("request dropped (fault injection)")),
        "{err}"
    );
    assert!(
        started.elapsed() >= REQUEST_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        handler.count(),
        60,
        "the lost request never reached the peer"
    );
    assert_eq!(
        faults.injected(),
        InjectedFaults {
            requests_dropped: 1,
            ..InjectedFaults::default()
        }
    );

    // A lost reply: the handler ran once, the caller still times out (outcome unknown).
    faults.shape(
        peer_addr,
        LinkShape {
            drop_response: 1.0,
            ..LinkShape::default()
        },
    );
    let err = call(61).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, NetError::Timeout { what, .. } if what.contains("reply dropped (fault injection)")),
        "{err}"
    );
    assert_eq!(handler.count(), 61, "the peer handled the request once");
    assert_eq!(faults.injected().responses_dropped, 1);
    // Calls by address take the same path.
    let err = timeout(DEADLINE, transport.call_addr(peer_addr, request(62)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        err.to_string().contains("reply dropped (fault injection)"),
        "{err}"
    );
    assert_eq!(handler.count(), 62);
    assert_eq!(faults.injected().responses_dropped, 2);

    // A duplicated request: the caller gets the (first) reply, the handler runs twice.
    faults.shape(
        peer_addr,
        LinkShape {
            duplicate: 1.0,
            ..LinkShape::default()
        },
    );
    assert_eq!(
        call(63).await.unwrap().unwrap(),
        echo_reply(1, b"n2:", &request(63))
    );
    wait_for("the copy answered", || {
        faults.injected().requests_duplicated == 1
    })
    .await;
    assert_eq!(handler.count(), 64, "delivered twice, not more");
    assert_eq!(
        faults.injected(),
        InjectedFaults {
            requests_dropped: 1,
            responses_dropped: 2,
            requests_duplicated: 1,
        }
    );

    // Healed: delivered once again, nothing more injected.
    faults.shape(peer_addr, LinkShape::default());
    assert!(call(64).await.unwrap().is_ok());
    assert_eq!(handler.count(), 65);
    assert_eq!(faults.injected().requests_duplicated, 1);
}

#[tokio::test]
async fn shaped_links_drop_and_duplicate_calls_over_quic() {
    faults_on(quic_link(1, REQUEST_TIMEOUT)).await;
}

#[tokio::test]
async fn shaped_links_drop_and_duplicate_calls_in_memory() {
    faults_on(mem_link(1, REQUEST_TIMEOUT)).await;
}

/// Partial chances over many calls: each fault fires about as often as asked, what reached
/// the handler matches what was injected, and the same seed replays the same faults.
async fn mixed_faults<T: Transport>(link: Link<T>) -> InjectedFaults {
    let Link {
        transport,
        faults,
        peer_addr,
        handler,
        ..
    } = link;
    faults.shape(
        peer_addr,
        LinkShape {
            drop_request: 0.2,
            drop_response: 0.2,
            duplicate: 0.2,
            ..LinkShape::default()
        },
    );
    const CALLS: u32 = 60;
    // One call at a time, so the seed decides which call gets which draw.
    let mut ok = 0;
    for n in 0..CALLS {
        if timeout(DEADLINE, transport.call(PEER, request(n)))
            .await
            .unwrap()
            .is_ok()
        {
            ok += 1;
        }
    }
    wait_for("every copy answered", || {
        let f = faults.injected();
        handler.count() as u64 == u64::from(CALLS) - f.requests_dropped + f.requests_duplicated
    })
    .await;
    let injected = faults.injected();
    for (fault, n) in [
        ("requests dropped", injected.requests_dropped),
        ("responses dropped", injected.responses_dropped),
        ("requests duplicated", injected.requests_duplicated),
    ] {
        assert!((5..=45).contains(&n), "{fault}: {n} of {CALLS}");
    }
    assert_eq!(
        ok,
        u64::from(CALLS) - injected.requests_dropped - injected.responses_dropped,
        "every call not faulted succeeded"
    );
    injected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_seed_injects_the_same_faults_on_both_transports() {
    let quic = mixed_faults(quic_link(42, MIXED_TIMEOUT)).await;
    let mem = mixed_faults(mem_link(42, MIXED_TIMEOUT)).await;
    assert_eq!(quic, mem, "one seed, one sequence of faults");
    assert_eq!(mixed_faults(mem_link(42, MIXED_TIMEOUT)).await, mem);
}

#[tokio::test]
async fn a_cut_in_link_faults_fails_in_memory_calls_and_streams_at_once() {
    let link = mem_link(0, REQUEST_TIMEOUT);
    link.faults.cut(link.peer_addr);
    let err = link.transport.call(PEER, request(0)).await.unwrap_err();
    assert!(
        matches!(err, NetError::LinkCut { from: 1, to: PEER }),
        "{err}"
    );
    let err = link
        .transport
        .open_stream(PEER, request(1))
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(err, NetError::LinkCut { from: 1, to: PEER }),
        "{err}"
    );
    assert_eq!(link.handler.count(), 0);
    link.faults.heal(link.peer_addr);
    assert!(link.transport.call(PEER, request(2)).await.is_ok());
}
