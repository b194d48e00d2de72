//! In-memory network: cutting, isolating, healing and killing nodes.

mod common;

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
