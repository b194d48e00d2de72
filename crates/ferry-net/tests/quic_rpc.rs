//! Peer RPC over real QUIC on loopback with mutual TLS.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use ferry_net::framing::{read_frame, write_frame};
use ferry_net::tls::{self, dev_ca};
use ferry_net::{
    NetError, QuicTransport, Transport, TransportOptions, ALPN_CLIENT, ALPN_PEER, NODE_SERVER_NAME,
};
use rustls_pki_types::pem::PemObject;
use tokio::time::{timeout, Instant};

fn transport(
    self_id: u64,
    id: &tls::TlsIdentity,
    endpoint: quinn::Endpoint,
    peers: &[(u64, std::net::SocketAddr)],
    opts: TransportOptions,
) -> QuicTransport {
    let cfg = tls::client_config(id, ALPN_PEER).expect("client config");
    QuicTransport::new(
        self_id,
        endpoint,
        cfg,
        peers.iter().copied().collect::<HashMap<_, _>>(),
        opts,
    )
}

#[tokio::test]
async fn concurrent_calls_share_one_connection_and_report_sender() {
    let ca = dev_ca().unwrap();
    let id1 = ca.issue_node(1).unwrap();
    let id2 = ca.issue_node(2).unwrap();
    let echo2 = Echo::new(b"n2:");
    let n2 = start_echo_node(&id2, echo2.clone());
    let n1 = start_echo_node(&id1, Echo::new(b"n1:"));

    let t = transport(
        1,
        &id1,
        n1.endpoint.clone(),
        &[(2, n2.addr)],
        TransportOptions::default(),
    );
    let calls = (0..500u32).map(|i| {
        let t = t.clone();
        async move {
            let req = Bytes::from(format!("request {i}"));
            let reply = t.call(2, req.clone()).await?;
            assert_eq!(reply, echo_reply(1, b"n2:", &req), "reply to request {i}");
            Ok::<_, NetError>(())
        }
    });
    let results = timeout(DEADLINE, futures::future::join_all(calls))
        .await
        .expect("calls within deadline");
    for r in results {
        r.expect("call succeeded");
    }
    assert_eq!(echo2.count(), 500);
    assert_eq!(
        n2.endpoint.open_connections(),
        1,
        "all calls share one connection"
    );

    // A 1 MiB payload round-trips.
    let big = Bytes::from(vec![7u8; 1 << 20]);
    let reply = timeout(DEADLINE, t.call(2, big.clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, echo_reply(1, b"n2:", &big));

    // Unknown peers are reported as such.
    let err = t.call(99, Bytes::new()).await.unwrap_err();
    assert!(matches!(err, NetError::UnknownPeer(99)), "{err}");
}

#[tokio::test]
async fn client_alpn_connections_go_to_on_client() {
    let ca = dev_ca().unwrap();
    let mut node = start_echo_node(&ca.issue_node(1).unwrap(), Echo::new(b""));
    let alice = ca.issue_client("alice").unwrap();
    let ep = client_endpoint();
    let cfg = tls::client_config(&alice, ALPN_CLIENT).unwrap();
    let conn = timeout(
        DEADLINE,
        ep.connect_with(cfg, node.addr, NODE_SERVER_NAME).unwrap(),
    )
    .await
    .expect("deadline")
    .expect("client connects");
    let server_side = timeout(DEADLINE, node.clients.recv())
        .await
        .expect("deadline")
        .expect("on_client called");
    assert_eq!(
        server_side.remote_address().port(),
        ep.local_addr().unwrap().port()
    );
    // Exchange a frame over the handed-over connection.
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    write_frame(&mut s, bytes::Bytes::from_static(b"hello"))
        .await
        .unwrap();
    let (_ss, mut sr) = timeout(DEADLINE, server_side.accept_bi())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        read_frame(&mut sr, 16).await.unwrap().unwrap(),
        Bytes::from_static(b"hello")
    );
    s.finish().unwrap();
    assert_eq!(
        read_frame(&mut sr, 16).await.unwrap(),
        None,
        "clean end of stream"
    );
    drop(r.stop(0u32.into()));
}

/// Tries a full request over a fresh connection; the result must be an error
/// (the handshake, or the connection right after it, must be refused).
async fn attempt(cfg: quinn::ClientConfig, addr: std::net::SocketAddr) -> Result<(), String> {
    let ep = client_endpoint();
    let conn = ep
        .connect_with(cfg, addr, NODE_SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // With TLS 1.3 the client may finish before the server rejects its cert.
    let (mut s, mut r) = conn.open_bi().await.map_err(|e| e.to_string())?;
    // Claims node 2, which the test certificates name; kind 0 is a call.
    let mut req = 2u64.to_be_bytes().to_vec();
    req.push(0);
    req.extend_from_slice(b"x");
    write_frame(&mut s, req.into())
        .await
        .map_err(|e| e.to_string())?;
    s.finish().map_err(|e| e.to_string())?;
    read_frame(&mut r, 1024).await.map_err(|e| e.to_string())?;
    Ok(())
}

fn assert_handshake_refused(r: Result<(), String>, who: &str) {
    match r {
        Ok(()) => panic!("{who} must be refused"),
        Err(e) => assert!(
            e.contains("handshake failed") || e.contains("certificate"),
            "{who} failed for an unrelated reason: {e}"
        ),
    }
}

#[tokio::test]
async fn handshake_refuses_foreign_or_missing_certificates() {
    let ca = dev_ca().unwrap();
    let foreign = dev_ca().unwrap();
    let echo = Echo::new(b"");
    let node = start_echo_node(&ca.issue_node(1).unwrap(), echo.clone());

    // Sanity: a proper identity succeeds with the same code path.
    let good = tls::client_config(&ca.issue_node(2).unwrap(), ALPN_PEER).unwrap();
    timeout(DEADLINE, attempt(good, node.addr))
        .await
        .expect("deadline")
        .expect("good cert accepted");
    assert_eq!(echo.count(), 1);

    // Client certificate signed by a foreign CA (trusting our CA for the server).
    let mut bad = foreign.issue_node(2).unwrap();
    bad.ca_pem = ca.ca_pem();
    let cfg = tls::client_config(&bad, ALPN_PEER).unwrap();
    let r = timeout(DEADLINE, attempt(cfg, node.addr))
        .await
        .expect("deadline");
    assert_handshake_refused(r, "foreign-CA client");

    // Same through the transport API.
    let t = transport(
        2,
        &bad,
        client_endpoint(),
        &[(1, node.addr)],
        TransportOptions::default(),
    );
    let err = timeout(DEADLINE, t.call(1, Bytes::from_static(b"x")))
        .await
        .expect("deadline");
    assert_handshake_refused(
        err.map(|_| ()).map_err(|e| e.to_string()),
        "foreign-CA transport call",
    );

    // No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&ca.ca_pem()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut rc = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    rc.alpn_protocols = vec![ALPN_PEER.to_vec()];
    let cfg = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(rc).unwrap(),
    ));
    let r = timeout(DEADLINE, attempt(cfg, node.addr))
        .await
        .expect("deadline");
    assert_handshake_refused(r, "client without certificate");

    assert_eq!(echo.count(), 1, "no refused client reached the handler");

    // A server with a foreign-CA certificate is refused by our client.
    let rogue = start_echo_node(
        &{
            let mut id = foreign.issue_node(3).unwrap();
            id.ca_pem = ca.ca_pem();
            id
        },
        Echo::new(b""),
    );
    let t = transport(
        2,
        &ca.issue_node(2).unwrap(),
        client_endpoint(),
        &[(3, rogue.addr)],
        TransportOptions::default(),
    );
    let err = timeout(DEADLINE, t.call(3, Bytes::from_static(b"x")))
        .await
        .expect("deadline")
        .unwrap_err();
    assert!(
        matches!(&err, NetError::Connect { peer: 3, reason, .. } if reason.contains("certificate")),
        "{err}"
    );
}

#[tokio::test]
async fn oversized_frames_are_rejected_before_allocation() {
    let ca = dev_ca().unwrap();
    let server = start_node(
        &ca.issue_node(1).unwrap(),
        loopback0(),
        Echo::new(b""),
        1024,
    )
    .unwrap();
    // Raw stream: accept on a bare endpoint so we can call read_frame directly.
    let raw = ferry_net::bind_endpoint(
        loopback0(),
        tls::server_config(&ca.issue_node(3).unwrap(), &[ALPN_PEER]).unwrap(),
    )
    .unwrap();
    let raw_addr = raw.local_addr().unwrap();
    let id2 = ca.issue_node(2).unwrap();
    let ep = client_endpoint();
    let accept = tokio::spawn(async move {
        let conn = raw.accept().await.unwrap().await.unwrap();
        let (_s, mut r) = conn.accept_bi().await.unwrap();
        // Declared length is ~4 GiB: allocating it would abort the test.
        let res = read_frame(&mut r, 1024).await;
        (res, conn)
    });
    let conn = ep
        .connect_with(
            tls::client_config(&id2, ALPN_PEER).unwrap(),
            raw_addr,
            NODE_SERVER_NAME,
        )
        .unwrap()
        .await
        .unwrap();
    let (mut s, _r) = conn.open_bi().await.unwrap();
    s.write_all(&0xFFFF_FFF0u32.to_be_bytes()).await.unwrap();
    s.write_all(b"abc").await.unwrap();
    let (res, _conn) = timeout(DEADLINE, accept).await.expect("deadline").unwrap();
    match res {
        Err(NetError::FrameTooLarge { len, max }) => {
            assert_eq!((len, max), (0xFFFF_FFF0, 1024));
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }

    // The transport refuses to send an oversized request locally...
    let opts = TransportOptions {
        max_frame: 1024,
        ..TransportOptions::default()
    };
    let t = transport(2, &id2, client_endpoint(), &[(1, server.addr)], opts);
    let err = t.call(1, Bytes::from(vec![0u8; 1025])).await.unwrap_err();
    assert!(
        matches!(
            err,
            NetError::FrameTooLarge {
                len: 1025,
                max: 1024
            }
        ),
        "{err}"
    );
    // ...and a server with a smaller limit answers with a remote error.
    let t = transport(
        2,
        &id2,
        client_endpoint(),
        &[(1, server.addr)],
        TransportOptions::default(),
    );
    let err = timeout(DEADLINE, t.call(1, Bytes::from(vec![0u8; 4096])))
        .await
        .expect("deadline")
        .unwrap_err();
    assert!(
        matches!(&err, NetError::Remote(m) if m.contains("exceeds")),
        "{err}"
    );
    // Small requests still work on the same connection.
    let reply = timeout(DEADLINE, t.call(1, Bytes::from_static(b"ok")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, echo_reply(2, b"", b"ok"));
}

#[tokio::test]
async fn transport_reconnects_after_peer_restart() {
    let ca = dev_ca().unwrap();
    let id1 = ca.issue_node(1).unwrap();
    let id2 = ca.issue_node(2).unwrap();
    let n2 = start_echo_node(&id2, Echo::new(b"v1:"));
    let addr = n2.addr;
    let opts = TransportOptions {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        backoff_initial: Duration::from_millis(300),
        backoff_max: Duration::from_millis(600),
        ..TransportOptions::default()
    };
    let t = transport(1, &id1, client_endpoint(), &[(2, addr)], opts);
    let reply = timeout(DEADLINE, t.call(2, Bytes::from_static(b"a")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, echo_reply(1, b"v1:", b"a"));

    // Kill node 2: close its endpoint and wait for the accept loop to end.
    n2.endpoint.close(0u32.into(), b"restart");
    timeout(DEADLINE, n2.endpoint.wait_idle())
        .await
        .expect("endpoint idle");
    timeout(DEADLINE, n2.task)
        .await
        .expect("serve returns")
        .unwrap();
    drop(n2.endpoint);

    // Calls now fail; a failed dial puts the peer in backoff (fail fast).
    let err = timeout(DEADLINE, t.call(2, Bytes::from_static(b"b")))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, NetError::Connect { peer: 2, .. } | NetError::Closed(_)),
        "{err}"
    );
    if matches!(err, NetError::Closed(_)) {
        let err = timeout(DEADLINE, t.call(2, Bytes::from_static(b"b")))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, NetError::Connect { peer: 2, .. }), "{err}");
    }
    let started = Instant::now();
    let err = t.call(2, Bytes::from_static(b"c")).await.unwrap_err();
    assert!(
        matches!(&err, NetError::Connect { reason, .. } if reason.contains("backoff")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "backoff fails fast"
    );

    // Restart node 2 on the same port with a new handler.
    let deadline = Instant::now() + DEADLINE;
    let _n2b = loop {
        match start_node(&id2, addr, Echo::new(b"v2:"), ferry_net::DEFAULT_MAX_FRAME) {
            Ok(n) => break n,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("rebind: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("could not rebind {addr}: {e}"),
        }
    };

    // Calls succeed again within the deadline.
    loop {
        match t.call(2, Bytes::from_static(b"d")).await {
            Ok(reply) => {
                assert_eq!(reply, echo_reply(1, b"v2:", b"d"));
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "no reconnect before deadline: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_peer_may_only_claim_the_node_id_its_certificate_names() {
    let ca = dev_ca().unwrap();
    let echo = Echo::new(b"n1:");
    let n1 = start_echo_node(&ca.issue_node(1).unwrap(), echo.clone());
    let check = |self_id: u64, identity: tls::TlsIdentity| {
        let t = transport(
            self_id,
            &identity,
            client_endpoint(),
            &[(1, n1.addr)],
            TransportOptions::default(),
        );
        async move {
            timeout(DEADLINE, t.call(1, Bytes::from_static(b"hi")))
                .await
                .expect("answer in time")
        }
    };
    // Node 2 speaking as node 2 is served.
    assert!(check(2, ca.issue_node(2).unwrap()).await.is_ok());
    // Node 2's certificate claiming to be node 3, or a client certificate claiming node 2,
    // is refused before the handler sees anything.
    let served = echo.count();
    let err = check(3, ca.issue_node(2).unwrap()).await.unwrap_err();
    assert!(
        matches!(&err, NetError::Remote(m) if m.contains("node id 3")),
        "{err}"
    );
    let err = check(2, ca.issue_client("ctl").unwrap()).await.unwrap_err();
    assert!(
        matches!(&err, NetError::Remote(m) if m.contains("node id 2")),
        "{err}"
    );
    assert_eq!(
        echo.count(),
        served,
        "refused requests never reached the handler"
    );
}

#[tokio::test]
async fn call_addr_reaches_whichever_node_listens_there() {
    let ca = dev_ca().unwrap();
    let id1 = ca.issue_node(1).unwrap();
    let echo2 = Echo::new(b"n2:");
    let n2 = start_echo_node(&ca.issue_node(2).unwrap(), echo2.clone());
    let n1 = start_echo_node(&id1, Echo::new(b"n1:"));
    // Node 1 knows no peers by id: only the address.
    let t = transport(
        1,
        &id1,
        n1.endpoint.clone(),
        &[],
        TransportOptions::default(),
    );
    let calls = (0..50u32).map(|i| {
        let t = t.clone();
        async move {
            let req = Bytes::from(format!("request {i}"));
            let reply = t.call_addr(n2.addr, req.clone()).await?;
            assert_eq!(reply, echo_reply(1, b"n2:", &req), "reply to request {i}");
            Ok::<_, NetError>(())
        }
    });
    for r in timeout(DEADLINE, futures::future::join_all(calls))
        .await
        .expect("calls within deadline")
    {
        r.expect("call by address succeeded");
    }
    assert_eq!(echo2.count(), 50);
    assert_eq!(
        n2.endpoint.open_connections(),
        1,
        "calls by address share one connection"
    );

    // The frame limit applies as for `call`.
    let opts = TransportOptions {
        max_frame: 16,
        ..TransportOptions::default()
    };
    let small = transport(1, &id1, client_endpoint(), &[], opts);
    let err = small
        .call_addr(n2.addr, Bytes::from(vec![0u8; 17]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, NetError::FrameTooLarge { len: 17, max: 16 }),
        "{err}"
    );

    // Nobody listening: a connect error naming the address (then fast backoff).
    let dead = std::net::UdpSocket::bind(loopback0())
        .unwrap()
        .local_addr()
        .unwrap();
    let opts = TransportOptions {
        connect_timeout: Duration::from_millis(300),
        backoff_initial: Duration::from_secs(5),
        ..TransportOptions::default()
    };
    let t = transport(1, &id1, client_endpoint(), &[], opts);
    let err = timeout(DEADLINE, t.call_addr(dead, Bytes::from_static(b"x")))
        .await
        .expect("deadline")
        .unwrap_err();
    assert!(
        matches!(err, NetError::ConnectAddr { addr, .. } if addr == dead),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("node at {dead}")),
        "{err}"
    );
    let err = timeout(DEADLINE, t.call_addr(dead, Bytes::from_static(b"x")))
        .await
        .expect("deadline")
        .unwrap_err();
    assert!(
        matches!(&err, NetError::ConnectAddr { reason, .. } if reason.contains("backoff")),
        "{err}"
    );
}

const LINK_CUT: &str = "link cut (fault injection)";

/// Awaits `call` and expects a prompt failure (well under the request timeout).
async fn fails_fast(
    call: impl std::future::Future<Output = Result<Bytes, NetError>>,
    what: &str,
) -> NetError {
    let started = Instant::now();
    let err = timeout(DEADLINE, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer before the deadline"))
        .expect_err(what);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{what}: failed only after {:?}: {err}",
        started.elapsed()
    );
    err
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn cut_links_fail_fast_both_ways_and_heal() {
    let ca = dev_ca().unwrap();
    let ids: Vec<_> = (1..=3).map(|i| ca.issue_node(i).unwrap()).collect();
    let echo_b = Echo::new(b"b:");
    let a = start_echo_node(&ids[0], Echo::new(b"a:"));
    let b = start_echo_node(&ids[1], echo_b.clone());
    let c = start_echo_node(&ids[2], Echo::new(b"c:"));
    let peers = [(1, a.addr), (2, b.addr), (3, c.addr)];
    let opts = |node: &Node| TransportOptions {
        request_timeout: Duration::from_secs(5),
        faults: node.faults.clone(),
        ..TransportOptions::default()
    };
    // Each node dials from the endpoint it serves on, as ferry-region does.
    let ta = transport(1, &ids[0], a.endpoint.clone(), &peers, opts(&a));
    let tb = transport(2, &ids[1], b.endpoint.clone(), &peers, opts(&b));
    let tc = transport(3, &ids[2], c.endpoint.clone(), &peers, opts(&c));
    let req = || Bytes::from_static(b"ping");
    let ok = |t: &QuicTransport, to: u64| {
        let t = t.clone();
        async move {
            timeout(DEADLINE, t.call(to, req()))
                .await
                .expect("deadline")
                .unwrap_or_else(|e| panic!("call to node {to}: {e}"))
        }
    };

    // Warm up: cached connections A→B (by id and by address), B→A, A↔C.
    assert_eq!(ok(&ta, 2).await, echo_reply(1, b"b:", b"ping"));
    timeout(DEADLINE, ta.call_addr(b.addr, req()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ok(&tb, 1).await, echo_reply(2, b"a:", b"ping"));
    ok(&ta, 3).await;
    ok(&tc, 1).await;

    // B cuts A: B's calls to A fail locally; A's requests, even over A's
    // existing connection, are refused by B's accept side.
    b.faults.cut(a.addr);
    let served = echo_b.count();
    let err = fails_fast(ta.call(2, req()), "A→B with B's side cut").await;
    assert!(
        matches!(&err, NetError::Remote(m) if m.contains(LINK_CUT)),
        "{err}"
    );
    let err = fails_fast(ta.call_addr(b.addr, req()), "A→B by address").await;
    assert!(
        matches!(&err, NetError::Remote(m) if m.contains(LINK_CUT)),
        "{err}"
    );
    let err = fails_fast(tb.call(1, req()), "B→A").await;
    assert!(
        matches!(&err, NetError::Connect { peer: 1, reason, .. } if reason.contains(LINK_CUT)),
        "{err}"
    );
    assert_eq!(echo_b.count(), served, "refused requests never reach B");

    // A cuts B too: both directions fail locally, without dialing.
    a.faults.cut(b.addr);
    let err = fails_fast(ta.call(2, req()), "A→B").await;
    assert!(
        matches!(&err, NetError::Connect { peer: 2, reason, .. } if reason.contains(LINK_CUT)),
        "{err}"
    );
    let err = fails_fast(ta.call_addr(b.addr, req()), "A→B by address").await;
    assert!(
        matches!(&err, NetError::ConnectAddr { addr, reason } if *addr == b.addr && reason.contains(LINK_CUT)),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("node at {}", b.addr)),
        "{err}"
    );
    let err = fails_fast(tb.call(1, req()), "B→A").await;
    assert!(
        matches!(&err, NetError::Connect { peer: 1, reason, .. } if reason.contains(LINK_CUT)),
        "{err}"
    );
    let err = fails_fast(tb.call_addr(a.addr, req()), "B→A by address").await;
    assert!(
        matches!(&err, NetError::ConnectAddr { reason, .. } if reason.contains(LINK_CUT)),
        "{err}"
    );
    // The cached connections between A and B were closed (B only had those).
    wait_until("B has no open connections", || {
        b.endpoint.open_connections() == 0
    })
    .await;
    // A↔C is unaffected.
    assert_eq!(ok(&ta, 3).await, echo_reply(1, b"c:", b"ping"));
    assert_eq!(ok(&tc, 1).await, echo_reply(3, b"a:", b"ping"));
    assert_eq!(echo_b.count(), served, "nothing reached B");

    // Healing restores calls at once (a cut link is no failed dial: no backoff).
    a.faults.heal(b.addr);
    b.faults.heal_all();
    assert_eq!(ok(&ta, 2).await, echo_reply(1, b"b:", b"ping"));
    assert_eq!(ok(&tb, 1).await, echo_reply(2, b"a:", b"ping"));
    let reply = timeout(DEADLINE, ta.call_addr(b.addr, req()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, echo_reply(1, b"b:", b"ping"));
    ok(&ta, 3).await;
}

/// Sends `count` frames on `stream` without waiting for answers, then reads the answers and
/// checks they are the echoes of the frames, in order.
async fn pipeline(stream: &mut ferry_net::PeerStream, from: u64, tag: &[u8], count: usize) {
    for i in 0..count {
        let frame = Bytes::from(format!("frame {i}"));
        timeout(DEADLINE, stream.sender.send(frame))
            .await
            .expect("send within deadline")
            .expect("send");
    }
    for i in 0..count {
        let answer = timeout(DEADLINE, stream.receiver.recv())
            .await
            .expect("answer within deadline")
            .expect("stream open")
            .expect("answer");
        assert_eq!(
            answer,
            echo_reply(from, tag, format!("frame {i}").as_bytes())
        );
    }
}

#[tokio::test]
async fn peer_streams_carry_ordered_frames_both_ways_and_end_cleanly() {
    let ca = dev_ca().unwrap();
    let id1 = ca.issue_node(1).unwrap();
    let echo2 = Echo::new(b"n2:");
    let n2 = start_echo_node(&ca.issue_node(2).unwrap(), echo2.clone());
    let t = transport(
        1,
        &id1,
        client_endpoint(),
        &[(2, n2.addr)],
        TransportOptions::default(),
    );
    let mut stream = timeout(DEADLINE, t.open_stream(2, Bytes::from_static(b"s1/")))
        .await
        .unwrap()
        .expect("stream opens");
    // 2,000 frames go out before the first answer is read: they pipeline, in order.
    pipeline(&mut stream, 1, b"n2:s1/", 2000).await;
    // A 1 MiB frame goes through; one over the frame limit is refused before it is sent.
    let big = Bytes::from(vec![3u8; 1 << 20]);
    stream.sender.send(big.clone()).await.unwrap();
    let answer = timeout(DEADLINE, stream.receiver.recv()).await.unwrap();
    assert_eq!(answer.unwrap().unwrap(), echo_reply(1, b"n2:s1/", &big));
    let err = stream
        .sender
        .send(Bytes::from(vec![0u8; ferry_net::DEFAULT_MAX_FRAME + 1]))
        .await
        .unwrap_err();
    assert!(matches!(err, NetError::FrameTooLarge { .. }), "{err}");
    // Two streams and calls share the one connection.
    let mut second = t.open_stream(2, Bytes::from_static(b"s2/")).await.unwrap();
    pipeline(&mut second, 1, b"n2:s2/", 10).await;
    t.call(2, Bytes::from_static(b"call")).await.unwrap();
    assert_eq!(n2.endpoint.open_connections(), 1);
    // Dropping the sender ends the stream: the handler returns and the receiver sees the end.
    let ferry_net::PeerStream {
        sender,
        mut receiver,
    } = stream;
    drop(sender);
    let end = timeout(DEADLINE, receiver.recv())
        .await
        .expect("end in time");
    assert!(
        end.is_none(),
        "clean end, got {:?}",
        end.map(|r| r.map(|_| ()))
    );
}

#[tokio::test]
async fn a_stream_is_refused_for_a_false_node_id_and_ended_by_a_cut_link() {
    let ca = dev_ca().unwrap();
    let id1 = ca.issue_node(1).unwrap();
    let echo2 = Echo::new(b"n2:");
    let n2 = start_echo_node(&ca.issue_node(2).unwrap(), echo2.clone());

    // Node 1's certificate claiming node 3: the refusal is the stream's first item.
    let liar = transport(
        3,
        &id1,
        client_endpoint(),
        &[(2, n2.addr)],
        TransportOptions::default(),
    );
    let mut refused = liar.open_stream(2, Bytes::from_static(b"x")).await.unwrap();
    let first = timeout(DEADLINE, refused.receiver.recv()).await.unwrap();
    assert!(
        matches!(&first, Some(Err(NetError::Remote(m))) if m.contains("node id 3")),
        "{:?}",
        first.map(|r| r.map(|_| ()))
    );
    assert_eq!(echo2.count(), 0, "the handler never saw it");

    // A stream that works until node 2 cuts the link: the dialer's next answer is an error
    // or the end, and new streams are refused while the link is cut.
    let faults = ferry_net::LinkFaults::default();
    let endpoint = client_endpoint();
    let local = endpoint.local_addr().unwrap();
    let t = transport(
        1,
        &id1,
        endpoint,
        &[(2, n2.addr)],
        TransportOptions {
            faults: faults.clone(),
            ..TransportOptions::default()
        },
    );
    let mut stream = t.open_stream(2, Bytes::from_static(b"s/")).await.unwrap();
    pipeline(&mut stream, 1, b"n2:s/", 5).await;
    n2.faults.cut(local);
    let _ = stream
        .sender
        .send(Bytes::from_static(b"after the cut"))
        .await;
    let next = timeout(DEADLINE, stream.receiver.recv())
        .await
        .expect("in time");
    assert!(!matches!(next, Some(Ok(_))), "no answer passes a cut link");
    // The dialing side's own cut refuses new streams at once, without dialing.
    faults.cut(n2.addr);
    let err = timeout(DEADLINE, t.open_stream(2, Bytes::new()))
        .await
        .unwrap()
        .err()
        .expect("refused");
    assert!(matches!(&err, NetError::Connect { peer: 2, .. }), "{err}");
}

/// What a connection received changes with each answer from the peer, and there is no sample
/// before the first connection or after the peer closed it.
#[tokio::test]
async fn received_from_changes_with_answers_and_ends_with_the_connection() {
    let ca = dev_ca().unwrap();
    let id1 = ca.issue_node(1).unwrap();
    let id2 = ca.issue_node(2).unwrap();
    let n2 = start_echo_node(&id2, Echo::new(b"n2:"));
    let t = transport(
        1,
        &id1,
        client_endpoint(),
        &[(2, n2.addr)],
        TransportOptions::default(),
    );
    assert_eq!(t.received_from(2), None, "no connection yet");
    assert_eq!(t.received_from(99), None, "not a peer");
    timeout(DEADLINE, t.call(2, Bytes::from_static(b"a")))
        .await
        .unwrap()
        .unwrap();
    let first = t.received_from(2).expect("a sample once connected");
    timeout(DEADLINE, t.call(2, Bytes::from_static(b"b")))
        .await
        .unwrap()
        .unwrap();
    let second = t.received_from(2).expect("still connected");
    assert_eq!(first.connection, second.connection);
    assert!(
        second.datagrams > first.datagrams,
        "an answer came: {first:?} then {second:?}"
    );

    n2.endpoint.close(0u32.into(), b"gone");
    wait_until("the closed connection has no sample", || {
        t.received_from(2).is_none()
    })
    .await;
}
