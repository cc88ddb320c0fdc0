//! Receipts against a real node process: every acknowledgement carries a receipt the SDK
//! verifies and keeps, and kept receipts still verify after the signing key rotates twice.

use atlas_chaos::NodeProcess;
use atlas_client::{Client, RawConnection, ServerTrust};
use atlas_protocol::receipts::ReceiptError;
use atlas_protocol::{ClientBody, ErrorCode, ServerBody};
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_atlas");

fn rotate(node: &NodeProcess) {
    let body = node.admin_post("/admin/keys/rotate").unwrap();
    assert!(body.contains("kid"), "{body}");
}

async fn jwks(node: &NodeProcess, trust: &ServerTrust) -> atlas_protocol::transparency::Jwks {
    let (conn, _) = RawConnection::open(&node.url(), trust).await.unwrap();
    match conn.request(ClientBody::Jwks).await.unwrap() {
        ServerBody::Jwks(jwks) => jwks,
        other => panic!("expected the JWKS, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_survive_two_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(Path::new(BIN), &dir.path().join("node"), &[]).unwrap();
    let trust = ServerTrust::fingerprint(&node.fingerprint).unwrap();
    let mut clients = Vec::new();
    for account in ["alice", "bob"] {
        let mut client = Client::open(&dir.path().join(account), account).unwrap();
        client.connect(&node.url(), &trust).await.unwrap();
        client.publish_key_packages(2).await.unwrap();
        clients.push(client);
    }
    let group = clients[0].create_group("receipts").await.unwrap();
    let add_seq = clients[0].add_members(&group, &["bob"]).await.unwrap();
    clients[1].sync().await.unwrap();

    let mut kept = vec![add_seq];
    for round in 0..3 {
        let seq = clients[0]
            .send(&group, &format!("message {round}"))
            .await
            .unwrap();
        kept.push(seq);
        if round < 2 {
            rotate(&node);
        }
    }
    let jwks = jwks(&node, &trust).await;
    assert_eq!(jwks.keys.len(), 3);
    let mut kids = std::collections::BTreeSet::new();
    for seq in &kept {
        let receipt = clients[0]
            .receipt(&group, *seq)
            .expect("receipt kept")
            .clone();
        assert_eq!(receipt.fields.sender, clients[0].device_id());
        assert_eq!(receipt.verify(&jwks), Ok(()), "receipt of entry {seq}");
        let input = &receipt.receipt.signature_input;
        let kid = input
            .split("keyid=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next());
        kids.insert(kid.expect("receipt names its key").to_owned());
    }
    assert_eq!(
        kids.len(),
        3,
        "receipts are signed by the first key and both rotated ones"
    );

    // A member fetches a receipt for another member's entry; it names the sender.
    clients[1].sync().await.unwrap();
    let fetched = clients[1].fetch_receipt(&group, kept[1]).await.unwrap();
    assert_eq!(fetched.fields.sender, clients[0].device_id());
    assert_eq!(
        fetched.fields.content_digest,
        clients[0]
            .receipt(&group, kept[1])
            .unwrap()
            .fields
            .content_digest
    );

    // A signed field changed after the fact fails.
    let mut tampered = clients[0].receipt(&group, kept[1]).unwrap().clone();
    tampered.fields.seq += 1;
    assert_eq!(tampered.verify(&jwks), Err(ReceiptError::BadSignature));

    // Outsiders get no receipts.
    let mut carol = Client::open(&dir.path().join("carol"), "carol").unwrap();
    carol.connect(&node.url(), &trust).await.unwrap();
    let refused = carol.fetch_receipt(&group, kept[1]).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::NotMember));
}
