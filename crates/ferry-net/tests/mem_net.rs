//! In-memory network: cutting, isolating, healing and killing nodes.

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::{echo_reply, Echo};
use ferry_net::{MemNetwork, NetError, Transport};

#[tokio::test]
async fn cut_and_heal_links() {
    let net = MemNetwork::new();
    for id in 1..=3 {
        net.register(id, Echo::new(b""));
    }
    let t1 = net.transport(1);
    let t2 = net.transport(2);
    let req = || Bytes::from_static(b"ping");

    assert_eq!(
        t1.call(2, req()).await.unwrap(),
        echo_reply(1, b"", b"ping")
    );

    net.cut(1, 2);
    let err = t1.call(2, req()).await.unwrap_err();
    assert!(matches!(err, NetError::LinkCut { from: 1, to: 2 }), "{err}");
    let err = t2.call(1, req()).await.unwrap_err();
    assert!(matches!(err, NetError::LinkCut { from: 2, to: 1 }), "{err}");
    assert!(t1.call(3, req()).await.is_ok(), "other links unaffected");

    net.heal(2, 1);
    assert!(t1.call(2, req()).await.is_ok());
    assert!(t2.call(1, req()).await.is_ok());

    net.isolate(3);
    assert!(matches!(
        t1.call(3, req()).await,
        Err(NetError::LinkCut { .. })
    ));
    assert!(matches!(
        net.transport(3).call(2, req()).await,
        Err(NetError::LinkCut { .. })
    ));
    net.heal_all();
    assert!(t1.call(3, req()).await.is_ok());

    net.unregister(2);
    let err = t1.call(2, req()).await.unwrap_err();
    assert!(matches!(err, NetError::Connect { peer: 2, .. }), "{err}");
    net.register(2, Echo::new(b"new:"));
    assert_eq!(
        t1.call(2, req()).await.unwrap(),
        echo_reply(1, b"new:", b"ping")
    );
}

#[tokio::test]
async fn call_addr_resolves_addresses_and_obeys_links() {
    let net = MemNetwork::new();
    for id in 1..=3 {
        net.register(id, Echo::new(b""));
    }
    let a2: SocketAddr = "10.0.0.2:7000".parse().unwrap();
    let a3: SocketAddr = "10.0.0.3:7000".parse().unwrap();
    net.set_address(2, a2);
    net.set_address(3, a3);
    let t1 = net.transport(1);
    let req = || Bytes::from_static(b"ping");

    assert_eq!(
        t1.call_addr(a2, req()).await.unwrap(),
        echo_reply(1, b"", b"ping")
    );

    // An address no node has is a connect error naming it.
    let nowhere: SocketAddr = "10.0.0.9:7000".parse().unwrap();
    let err = t1.call_addr(nowhere, req()).await.unwrap_err();
    assert!(
        matches!(err, NetError::ConnectAddr { addr, .. } if addr == nowhere),
        "{err}"
    );
    assert!(err.to_string().contains("node at 10.0.0.9:7000"), "{err}");

    // Cuts, isolation and killed nodes apply as for `call`.
    net.cut(1, 2);
    let err = t1.call_addr(a2, req()).await.unwrap_err();
    assert!(matches!(err, NetError::LinkCut { from: 1, to: 2 }), "{err}");
    assert!(t1.call_addr(a3, req()).await.is_ok());
    net.heal(1, 2);
    assert!(t1.call_addr(a2, req()).await.is_ok());
    net.isolate(1);
    assert!(matches!(
        t1.call_addr(a3, req()).await,
        Err(NetError::LinkCut { from: 1, to: 3 })
    ));
    net.heal_all();
    net.unregister(2);
    let err = t1.call_addr(a2, req()).await.unwrap_err();
    assert!(matches!(err, NetError::Connect { peer: 2, .. }), "{err}");

    // Re-pointing an address: a2 now belongs to node 3, which gave up a3.
    net.register(3, Echo::new(b"n3:"));
    net.set_address(3, a2);
    assert_eq!(
        t1.call_addr(a2, req()).await.unwrap(),
        echo_reply(1, b"n3:", b"ping")
    );
    assert!(matches!(
        t1.call_addr(a3, req()).await,
        Err(NetError::ConnectAddr { .. })
    ));
}

#[tokio::test]
async fn streams_carry_ordered_frames_until_the_link_is_cut() {
    let net = MemNetwork::new();
    net.register(2, Echo::new(b"n2:"));
    let t1 = net.transport(1);
    let deadline = std::time::Duration::from_secs(10);
    let mut stream = t1.open_stream(2, Bytes::from_static(b"s/")).await.unwrap();
    // 200 frames go out before the first answer is read (within the queues each way).
    for i in 0..200 {
        tokio::time::timeout(deadline, stream.sender.send(Bytes::from(format!("{i}"))))
            .await
            .expect("queued in time")
            .unwrap();
    }
    for i in 0..200 {
        let answer = tokio::time::timeout(deadline, stream.receiver.recv())
            .await
            .expect("in time")
            .expect("open")
            .expect("answer");
        assert_eq!(answer, echo_reply(1, b"n2:s/", format!("{i}").as_bytes()));
    }
    net.cut(1, 2);
    stream.sender.send(Bytes::from_static(b"x")).await.unwrap();
    let next = tokio::time::timeout(deadline, stream.receiver.recv())
        .await
        .expect("in time");
    assert!(
        matches!(next, Some(Err(NetError::LinkCut { .. })) | None),
        "{:?}",
        next.map(|r| r.map(|_| ()))
    );
    let err = t1
        .open_stream(2, Bytes::new())
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, NetError::LinkCut { from: 1, to: 2 }), "{err}");
}
