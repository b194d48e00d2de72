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
