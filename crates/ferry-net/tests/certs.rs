//! Dev certificate generation on disk and loading.

mod common;

use bytes::Bytes;
use common::*;
use ferry_net::tls::{self, generate_dev_certs, DevCa, TlsIdentity};
use ferry_net::{
    NetError, QuicTransport, Transport, TransportOptions, ALPN_CLIENT, ALPN_PEER, NODE_SERVER_NAME,
};
use tokio::time::timeout;

fn load(dir: &std::path::Path, name: &str) -> Result<TlsIdentity, NetError> {
    TlsIdentity::load(
        &dir.join("ca.pem"),
        &dir.join(format!("{name}.pem")),
        &dir.join(format!("{name}.key")),
    )
}

#[tokio::test]
async fn generated_files_load_and_authenticate() {
    let tmp = TempDir::new("certs");
    let dir = tmp.path().join("pki");
    generate_dev_certs(&dir, &[1, 2], &["alice"]).unwrap();
    for f in [
        "ca.pem",
        "ca.key",
        "node-1.pem",
        "node-1.key",
        "node-2.pem",
        "node-2.key",
        "client-alice.pem",
        "client-alice.key",
    ] {
        assert!(dir.join(f).is_file(), "{f} written");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("node-1.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "key not readable by others");
    }

    // Refuses to overwrite, naming the file.
    let err = generate_dev_certs(&dir, &[1], &[]).unwrap_err();
    assert!(err.to_string().contains("ca.pem"), "{err}");

    // Missing file: the error names the path.
    let missing = dir.join("node-9.pem");
    let err =
        TlsIdentity::load(&dir.join("ca.pem"), &missing, &dir.join("node-1.key")).unwrap_err();
    match &err {
        NetError::Io { path, .. } => assert_eq!(path, &missing),
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(err.to_string().contains("node-9.pem"), "{err}");
    // Garbage file: the error names the path.
    std::fs::write(tmp.path().join("junk.pem"), b"not pem").unwrap();
    let err = TlsIdentity::load(
        &dir.join("ca.pem"),
        &tmp.path().join("junk.pem"),
        &dir.join("node-1.key"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("junk.pem"), "{err}");

    // The loaded identities really work together over QUIC.
    let id1 = load(&dir, "node-1").unwrap();
    let id2 = load(&dir, "node-2").unwrap();
    let mut n1 = start_echo_node(&id1, Echo::new(b"n1:"));
    let t = QuicTransport::new(
        2,
        client_endpoint(),
        tls::client_config(&id2, ALPN_PEER).unwrap(),
        [(1, n1.addr)].into_iter().collect(),
        TransportOptions::default(),
    );
    let reply = timeout(DEADLINE, t.call(1, Bytes::from_static(b"hi")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, echo_reply(2, b"n1:", b"hi"));

    // A node issued later from the re-opened CA chains to the same root.
    let ca = DevCa::load(&dir.join("ca.pem"), &dir.join("ca.key")).unwrap();
    let id3 = ca.issue_node(3).unwrap();
    let t3 = QuicTransport::new(
        3,
        client_endpoint(),
        tls::client_config(&id3, ALPN_PEER).unwrap(),
        [(1, n1.addr)].into_iter().collect(),
        TransportOptions::default(),
    );
    let reply = timeout(DEADLINE, t3.call(1, Bytes::from_static(b"hey")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, echo_reply(3, b"n1:", b"hey"));

    // The client certificate connects with the client ALPN.
    let alice = load(&dir, "client-alice").unwrap();
    let ep = client_endpoint();
    let conn = timeout(
        DEADLINE,
        ep.connect_with(
            tls::client_config(&alice, ALPN_CLIENT).unwrap(),
            n1.addr,
            NODE_SERVER_NAME,
        )
        .unwrap(),
    )
    .await
    .unwrap()
    .unwrap();
    let got = timeout(DEADLINE, n1.clients.recv()).await.unwrap().unwrap();
    assert_eq!(got.remote_address().port(), ep.local_addr().unwrap().port());
    drop(conn);
}

#[test]
fn invalid_client_names_are_rejected() {
    let tmp = TempDir::new("names");
    let err = generate_dev_certs(tmp.path(), &[1], &["../evil"]).unwrap_err();
    assert!(err.to_string().contains("../evil"), "{err}");
    assert!(
        !tmp.path().join("ca.pem").exists(),
        "nothing written on error"
    );
}
