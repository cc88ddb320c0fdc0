//! Key transparency against a real node process: lookups with proofs, revocation, key
//! rotation, signing key rotation, and forks and rollbacks caught by the SDK and the auditor.
//! The SDK also catches a group's log that was rolled back.

use atlas_chaos::{NodeProcess, copy_dir};
use atlas_client::audit::{AuditError, AuditOptions, audit};
use atlas_client::{Client, ClientError, RawConnection, ServerTrust, ViolationKind};
use atlas_protocol::transparency::{KeyEventKind, SignedTreeHead, key_event_statement};
use atlas_protocol::{ClientBody, DeviceId, ErrorCode, GroupId, ServerBody, login_transcript};
use ed25519_dalek::{Signer as _, SigningKey};
use std::path::{Path, PathBuf};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_atlas");

struct Node {
    dir: tempfile::TempDir,
    process: Option<NodeProcess>,
}

impl Node {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let process = NodeProcess::start(Path::new(BIN), &dir.path().join("node"), &[]).unwrap();
        Self {
            dir,
            process: Some(process),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("node")
    }

    fn process(&self) -> &NodeProcess {
        self.process.as_ref().expect("node is running")
    }

    fn url(&self) -> String {
        self.process().url()
    }

    fn trust(&self) -> ServerTrust {
        ServerTrust::fingerprint(&self.process().fingerprint).unwrap()
    }

    fn stop(&mut self) {
        let status = self
            .process
            .take()
            .unwrap()
            .terminate(Duration::from_secs(20))
            .unwrap();
        assert!(status.success(), "node exited with {status}");
    }

    fn restart(&mut self) {
        self.process = Some(NodeProcess::start(Path::new(BIN), &self.data(), &[]).unwrap());
    }

    /// Copies the stopped node's data directory to `name` inside the test directory.
    fn snapshot(&self, name: &str) -> PathBuf {
        let target = self.dir.path().join(name);
        copy_dir(&self.data(), &target).unwrap();
        target
    }

    /// Replaces the stopped node's data directory with a snapshot.
    fn restore(&self, snapshot: &Path) {
        std::fs::remove_dir_all(self.data()).unwrap();
        copy_dir(snapshot, &self.data()).unwrap();
    }

    async fn client(&self, name: &str, account: &str) -> Client {
        let mut client = Client::open(&self.dir.path().join(name), account).unwrap();
        client.connect(&self.url(), &self.trust()).await.unwrap();
        client
    }

    /// Opens a new device of `account` in state directory `name`, enrolls it from `existing`
    /// and connects it.
    async fn enrolled(&self, existing: &mut Client, name: &str, account: &str) -> Client {
        let mut client = Client::open(&self.dir.path().join(name), account).unwrap();
        let request = client.enrollment_request("localhost").unwrap();
        existing.enroll_device(&request).await.unwrap();
        client.connect(&self.url(), &self.trust()).await.unwrap();
        client
    }

    async fn audit(&self, state_file: Option<PathBuf>) -> Result<u64, AuditError> {
        let options = AuditOptions {
            from: 0,
            follow: None,
            max_polls: None,
            state_file,
        };
        audit(&self.url(), &self.trust(), &options, |_| {})
            .await
            .map(|report| report.entries_checked)
    }
}

async fn latest_head(node: &Node) -> SignedTreeHead {
    let (conn, _) = RawConnection::open(&node.url(), &node.trust())
        .await
        .unwrap();
    match conn.request(ClientBody::KtHead).await.unwrap() {
        ServerBody::KtHead(head) => head,
        other => panic!("expected a head, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_proves_every_device() {
    let node = Node::start();
    let mut first = node.client("alice-1", "alice").await;
    let second = node.enrolled(&mut first, "alice-2", "alice").await;
    let mut bob = node.client("bob", "bob").await;

    let mut devices = bob.lookup_devices("alice").await.unwrap();
    devices.sort();
    let mut expected = vec![first.device_id(), second.device_id()];
    expected.sort();
    assert_eq!(
        devices.iter().map(|(d, _)| *d).collect::<Vec<_>>(),
        expected
    );
    let history = bob.key_history("alice").await.unwrap();
    assert_eq!(history.len(), 2);
    assert!(history.iter().all(|(_, e)| e.kind == KeyEventKind::Added));
    assert_eq!(bob.kt_latest_head().unwrap().size, 3);
    assert_eq!(node.audit(None).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_device_is_refused() {
    let node = Node::start();
    let mut keeper = node.client("alice-1", "alice").await;
    let mut lost = node.enrolled(&mut keeper, "alice-2", "alice").await;
    lost.publish_key_packages(2).await.unwrap();
    let lost_id = lost.device_id();
    drop(lost);

    keeper.revoke_device(lost_id).await.unwrap();
    let devices = keeper.lookup_devices("alice").await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].0, keeper.device_id());

    let claim = keeper
        .request(ClientBody::ClaimKeyPackage { device: lost_id })
        .await
        .unwrap_err();
    assert_eq!(claim.code(), Some(ErrorCode::DeviceRevoked));

    let mut again = Client::open(&node.dir.path().join("alice-2"), "alice").unwrap();
    let login = again.connect(&node.url(), &node.trust()).await.unwrap_err();
    assert_eq!(login.code(), Some(ErrorCode::DeviceRevoked), "{login}");

    let history = keeper.key_history("alice").await.unwrap();
    let kinds: Vec<KeyEventKind> = history.iter().map(|(_, e)| e.kind).collect();
    assert_eq!(
        kinds,
        [
            KeyEventKind::Added,
            KeyEventKind::Added,
            KeyEventKind::Revoked
        ]
    );
    // The auditor replays the revocation and checks the revoking device's signature.
    assert_eq!(node.audit(None).await.unwrap(), 3);
}

/// Logs a raw connection in with `key`; returns the connection.
async fn raw_login(node: &Node, key: &SigningKey, account: &str) -> RawConnection {
    let (conn, challenge) = RawConnection::open(&node.url(), &node.trust())
        .await
        .unwrap();
    let ServerBody::Challenge {
        nonce, server_name, ..
    } = challenge
    else {
        panic!("expected a challenge");
    };
    let body = ClientBody::Login {
        account: account.to_owned(),
        device_key: key.verifying_key().to_bytes().to_vec(),
        signature: key
            .sign(&login_transcript(&server_name, &nonce, account))
            .to_bytes()
            .to_vec(),
    };
    match conn.request(body).await.unwrap() {
        ServerBody::LoggedIn { .. } => conn,
        other => panic!("login failed: {other:?}"),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_keeps_old_key_provable() {
    let node = Node::start();
    let old = SigningKey::from_bytes(&[11; 32]);
    let new = SigningKey::from_bytes(&[12; 32]);
    let conn = raw_login(&node, &old, "carol").await;
    let new_key = new.verifying_key().to_bytes().to_vec();
    let new_device = DeviceId::for_key(&new_key);
    let time_ms = now_ms();
    let statement = key_event_statement(
        KeyEventKind::Rotated,
        "localhost",
        "carol",
        &new_device,
        &new_key,
        time_ms,
    );

    // A rotation signed by the old key alone is refused.
    let unsigned_new = conn
        .request(ClientBody::RotateDeviceKey {
            new_key: new_key.clone(),
            time_ms,
            signature: old.sign(&statement).to_bytes().to_vec(),
            new_key_signature: old.sign(&statement).to_bytes().to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(unsigned_new.code(), Some(ErrorCode::BadSignature));

    let rotated = conn
        .request(ClientBody::RotateDeviceKey {
            new_key: new_key.clone(),
            time_ms,
            signature: old.sign(&statement).to_bytes().to_vec(),
            new_key_signature: new.sign(&statement).to_bytes().to_vec(),
        })
        .await
        .unwrap();
    assert!(matches!(rotated, ServerBody::KeyRotated { device, index: 1 } if device == new_device));

    // The new key logs in; the old one is revoked.
    drop(raw_login(&node, &new, "carol").await);
    let mut reader = node.client("reader", "reader").await;
    let history = reader.key_history("carol").await.unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].1.key, old.verifying_key().to_bytes().to_vec());
    assert_eq!(history[1].1.kind, KeyEventKind::Rotated);
    let current = reader.lookup_devices("carol").await.unwrap();
    assert_eq!(current, vec![(new_device, new_key)]);
    assert_eq!(node.audit(None).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_verify_after_signing_key_rotations() {
    let node = Node::start();
    let mut alice = node.client("alice", "alice").await;
    let first = alice.kt_latest_head().unwrap().clone();
    for round in 0..2 {
        let body = node.process().admin_post("/admin/keys/rotate").unwrap();
        assert!(body.contains("kid"), "{body}");
        drop(
            node.client(&format!("device-{round}"), &format!("user{round}"))
                .await,
        );
    }
    let head = latest_head(&node).await;
    assert_ne!(
        head.kid, first.kid,
        "the new head is signed by the rotated key"
    );
    alice.check_head(&head).await.unwrap();
    let (conn, _) = RawConnection::open(&node.url(), &node.trust())
        .await
        .unwrap();
    let ServerBody::Jwks(jwks) = conn.request(ClientBody::Jwks).await.unwrap() else {
        panic!("expected the JWKS");
    };
    assert_eq!(jwks.keys.len(), 3);
    assert!(first.verify(&jwks, now_ms()).is_ok());
    assert!(head.verify(&jwks, now_ms()).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_is_caught_by_client_and_auditor() {
    let mut node = Node::start();
    drop(node.client("alice", "alice").await);
    node.stop();
    let snapshot = node.snapshot("before");
    node.restart();

    let mut bob = node.client("bob", "bob").await;
    drop(node.client("carol", "carol").await);
    bob.check_head(&latest_head(&node).await).await.unwrap();
    assert_eq!(bob.kt_latest_head().unwrap().size, 3);
    let audit_state = node.dir.path().join("audit-head.json");
    assert_eq!(node.audit(Some(audit_state.clone())).await.unwrap(), 3);
    bob.disconnect();

    // The operator (or an attacker) puts the older data directory back.
    node.stop();
    node.restore(&snapshot);
    node.restart();

    let err = bob.connect(&node.url(), &node.trust()).await.unwrap_err();
    let ClientError::Security(violation) = err else {
        panic!("expected a security error, got {err}");
    };
    assert_eq!(violation.kind, ViolationKind::Rollback);
    assert_eq!(violation.seen.size, 3);
    // The restored node registered bob again when he logged in, so its log has 2 entries.
    assert_eq!(violation.presented.size, 2);

    // The violation is kept: a reopened client refuses the server too.
    drop(bob);
    let mut reopened = Client::open(&node.dir.path().join("bob"), "bob").unwrap();
    assert!(reopened.kt_violation().is_some());
    let again = reopened
        .connect(&node.url(), &node.trust())
        .await
        .unwrap_err();
    assert!(matches!(again, ClientError::Security(_)), "{again}");

    let audit_err = node.audit(Some(audit_state)).await.unwrap_err();
    assert!(
        matches!(audit_err, AuditError::Inconsistent { .. }),
        "{audit_err}"
    );
}

/// Returns the detail of a [`ClientError::LogConflict`], and panics on anything else.
fn conflict<T>(result: Result<T, ClientError>) -> String {
    match result {
        Err(ClientError::LogConflict(detail)) => detail,
        Err(e) => panic!("expected a log conflict, got {e}"),
        Ok(_) => panic!("expected a log conflict, got success"),
    }
}

/// Creates group `name` of alice with bob and carol, who have joined it.
async fn three_members(node: &Node, name: &str) -> (Client, Client, Client, GroupId) {
    let mut alice = node.client("alice", "alice").await;
    let mut bob = node.client("bob", "bob").await;
    let mut carol = node.client("carol", "carol").await;
    bob.publish_key_packages(1).await.unwrap();
    carol.publish_key_packages(1).await.unwrap();
    let group = alice.create_group(name).await.unwrap();
    alice.add_members(&group, &["bob", "carol"]).await.unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    (alice, bob, carol, group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_log_rollback_is_caught() {
    let mut node = Node::start();
    let (alice, bob, carol, group) = three_members(&node, "restored").await;
    drop((alice, bob, carol));
    node.stop();
    let snapshot = node.snapshot("before-message");
    node.restart();

    let mut alice = node.client("alice", "alice").await;
    let seq = alice.send(&group, "read by all").await.unwrap();
    for name in ["bob", "carol"] {
        let mut member = node.client(name, name).await;
        member.sync().await.unwrap();
        assert_eq!(member.cursor(&group), Some(seq));
    }
    drop(alice);

    // The node comes back without the message. No device was registered meanwhile, so its
    // key log matches what the clients saw, and only the group's log shows the loss.
    node.stop();
    node.restore(&snapshot);
    node.restart();
    let read = vec![(seq, "alice".to_owned(), "read by all".to_owned())];

    // The log ends before bob's cursor. Once found, the conflict stays: bob's send is
    // refused before it reaches the node.
    let mut bob = node.client("bob", "bob").await;
    let ends = conflict(bob.sync_group(&group).await);
    assert!(
        ends.contains(&format!("ends at entry {}", seq - 1)),
        "{ends}"
    );
    let refused = conflict(bob.send(&group, "from bob").await);
    assert_eq!(refused, ends);
    assert_eq!(bob.transcript(&group), read);

    // The node hands alice's next message the position of her first.
    let mut alice = node.client("alice", "alice").await;
    let taken = conflict(alice.send(&group, "after the restore").await);
    assert!(taken.contains(&format!("as entry {seq}")), "{taken}");

    // Now the log reaches carol's cursor again, with another entry there.
    let mut carol = node.client("carol", "carol").await;
    let other = conflict(carol.sync_group(&group).await);
    assert!(other.contains("is not the one this device read"), "{other}");
    assert_eq!(carol.transcript(&group), read);
    assert_eq!(carol.cursor(&group), Some(seq));
    assert_eq!(carol.log_conflict(&group), Some(other.as_str()));
    // A full sync leaves the group out, and the conflict outlives the process.
    assert!(carol.sync().await.unwrap().is_empty());
    drop(carol);
    let mut reopened = node.client("carol", "carol").await;
    assert_eq!(conflict(reopened.sync_group(&group).await), other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_entry_acknowledged_ahead_is_checked() {
    let mut node = Node::start();
    let (alice, mut bob, carol, group) = three_members(&node, "ahead").await;
    let behind = bob.send(&group, "from bob").await.unwrap();
    drop((alice, bob, carol));
    node.stop();
    let snapshot = node.snapshot("after-bob");
    node.restart();

    // Alice has not read bob's message, so her own is acknowledged ahead of her cursor.
    let mut alice = node.client("alice", "alice").await;
    let own = alice.send(&group, "from alice").await.unwrap();
    assert_eq!(own, behind + 1);
    assert_eq!(alice.cursor(&group), Some(behind - 1));
    drop(alice);

    // The node loses alice's message, and carol's takes its position.
    node.stop();
    node.restore(&snapshot);
    node.restart();
    let mut carol = node.client("carol", "carol").await;
    assert_eq!(carol.send(&group, "from carol").await.unwrap(), own);

    // Alice's sync reads bob's message, moves her cursor over her own entry, then meets
    // carol's there.
    let mut alice = node.client("alice", "alice").await;
    let detail = conflict(alice.sync_group(&group).await);
    assert!(
        detail.contains(&format!("as entry {own}, but its log holds another entry")),
        "{detail}"
    );
    let transcript = alice.transcript(&group);
    assert!(
        !transcript.iter().any(|(_, _, text)| text == "from carol"),
        "{transcript:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_membership_is_a_conflict() {
    let mut node = Node::start();
    let mut alice = node.client("alice", "alice").await;
    let mut dave = node.client("dave", "dave").await;
    dave.publish_key_packages(1).await.unwrap();
    let group = alice.create_group("restored").await.unwrap();
    drop((alice, dave));
    node.stop();
    let snapshot = node.snapshot("before-add");
    node.restart();

    let mut alice = node.client("alice", "alice").await;
    alice.add_members(&group, &["dave"]).await.unwrap();
    let mut dave = node.client("dave", "dave").await;
    dave.sync().await.unwrap();
    assert!(dave.groups().contains(&group));
    drop((alice, dave));

    // The node loses the commit that added dave. It reports that dave is no member, at an
    // epoch before his own: a conflict, not a removal he has yet to read.
    node.stop();
    node.restore(&snapshot);
    node.restart();
    let mut dave = node.client("dave", "dave").await;
    let lost = conflict(dave.sync_group(&group).await);
    assert!(lost.contains("without this device"), "{lost}");
    assert!(dave.groups().contains(&group));
    assert_eq!(dave.log_conflict(&group), Some(lost.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_saved_head_accuses_no_one() {
    let node = Node::start();
    drop(node.client("alice", "alice").await);
    let mut bob = node.client("bob", "bob").await;
    bob.check_head(&latest_head(&node).await).await.unwrap();
    let kept_head = bob.kt_latest_head().unwrap().clone();
    let audit_state = node.dir.path().join("audit-head.json");
    assert_eq!(node.audit(Some(audit_state.clone())).await.unwrap(), 2);
    bob.disconnect();
    drop(bob);

    // One byte of the root changes in the auditor's file: the head no longer verifies, and
    // the auditor reports a damaged file instead of a fork.
    let mut saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&audit_state).unwrap()).unwrap();
    let first = saved["head"]["root"][0].as_u64().unwrap();
    saved["head"]["root"][0] = (first ^ 1).into();
    std::fs::write(&audit_state, serde_json::to_vec(&saved).unwrap()).unwrap();
    let audit_err = node.audit(Some(audit_state)).await.unwrap_err();
    assert!(
        matches!(&audit_err, AuditError::State { detail, .. } if detail.contains("does not verify")),
        "{audit_err}"
    );

    // The same damage to bob's saved head: his client refuses to go on with a damaged state
    // and records no violation against the server.
    let state_file = node.dir.path().join("bob").join("client-state.msgpack");
    let mut state = std::fs::read(&state_file).unwrap();
    let at = state
        .windows(kept_head.root.len())
        .position(|w| w == kept_head.root)
        .expect("the kept root is in the client state");
    state[at] ^= 1;
    std::fs::write(&state_file, state).unwrap();
    let mut reopened = Client::open(&node.dir.path().join("bob"), "bob").unwrap();
    let err = reopened
        .connect(&node.url(), &node.trust())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::KeyTransparency(detail) if detail.contains("damaged")),
        "{err}"
    );
    assert!(reopened.kt_violation().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forked_log_is_caught_by_client_and_auditor() {
    let mut node = Node::start();
    drop(node.client("alice", "alice").await);
    node.stop();
    let snapshot = node.snapshot("fork-base");
    node.restart();

    // Bob and the auditor see a log in which carol registered as the third entry.
    let mut bob = node.client("bob", "bob").await;
    drop(node.client("carol", "carol").await);
    bob.check_head(&latest_head(&node).await).await.unwrap();
    let audit_state = node.dir.path().join("audit-head.json");
    node.audit(Some(audit_state.clone())).await.unwrap();
    bob.disconnect();

    // The node is replaced by one whose log has mallory's key where carol's was, and a
    // different second entry: the same sizes with other roots.
    node.stop();
    node.restore(&snapshot);
    node.restart();
    drop(node.client("mallory", "mallory").await);
    drop(node.client("trent", "trent").await);

    let err = bob.connect(&node.url(), &node.trust()).await.unwrap_err();
    let ClientError::Security(violation) = err else {
        panic!("expected a security error, got {err}");
    };
    assert_eq!(violation.kind, ViolationKind::Fork);
    assert_ne!(violation.seen.root, violation.presented.root);

    let audit_err = node.audit(Some(audit_state)).await.unwrap_err();
    assert!(
        matches!(audit_err, AuditError::Inconsistent { .. }),
        "{audit_err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_account_is_not_taken_over() {
    let node = Node::start();
    let mut owner = node.client("carol", "carol").await;
    let mut intruder = Client::open(&node.dir.path().join("intruder"), "carol").unwrap();
    let refused = intruder
        .connect(&node.url(), &node.trust())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::InvalidAccount), "{refused}");
    assert_eq!(owner.lookup_devices("carol").await.unwrap().len(), 1);

    // An enrollment request for another account is refused by the SDK before it is sent.
    let stranger = Client::open(&node.dir.path().join("stranger"), "dave").unwrap();
    let request = stranger.enrollment_request("localhost").unwrap();
    assert!(owner.enroll_device(&request).await.is_err());

    // A device that revoked itself is disconnected and cannot sign anything more.
    let mut second = node.enrolled(&mut owner, "carol-2", "carol").await;
    let second_id = second.device_id();
    second.revoke_device(second_id).await.unwrap();
    let after = second.lookup_devices("carol").await;
    assert!(after.is_err(), "the revoked device's connection stays open");
    assert_eq!(node.audit(None).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_history_is_paged() {
    let node = Node::start();
    let mut owner = node.client("erin", "erin").await;
    // Each enrollment and revocation adds an entry to erin's history.
    for i in 0..150 {
        let device = node
            .enrolled(&mut owner, &format!("erin-{i}"), "erin")
            .await;
        let id = device.device_id();
        drop(device);
        owner.revoke_device(id).await.unwrap();
    }
    let history = owner.key_history("erin").await.unwrap();
    assert_eq!(history.len(), 301);
    let indexes: Vec<u64> = history.iter().map(|(i, _)| *i).collect();
    assert_eq!(indexes, (0..301).collect::<Vec<_>>());
    let options = AuditOptions {
        from: 200,
        follow: None,
        max_polls: None,
        state_file: None,
    };
    let report = audit(&node.url(), &node.trust(), &options, |_| {})
        .await
        .unwrap();
    assert_eq!(report.entries_checked, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_queries_work_before_login() {
    let node = Node::start();
    drop(node.client("alice", "alice").await);
    let (conn, _) = RawConnection::open(&node.url(), &node.trust())
        .await
        .unwrap();
    let ServerBody::KtHead(head) = conn.request(ClientBody::KtHead).await.unwrap() else {
        panic!("expected a head");
    };
    assert_eq!(head.size, 1);
    let beyond = conn
        .request(ClientBody::KtConsistency { from: 1, to: 5 })
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), Some(ErrorCode::InvalidRequest));
    let zero = conn
        .request(ClientBody::KtConsistency { from: 0, to: 1 })
        .await
        .unwrap_err();
    assert_eq!(zero.code(), Some(ErrorCode::InvalidRequest));
    for account in ["", "Alice", "alice\0", &"a".repeat(65)] {
        let invalid = conn
            .request(ClientBody::KtHistory {
                account: account.to_owned(),
                start: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(
            invalid.code(),
            Some(ErrorCode::InvalidAccount),
            "{account:?}"
        );
    }
    // Any other request before login ends the connection.
    let private = conn.request(ClientBody::Welcomes).await.unwrap_err();
    assert_eq!(private.code(), Some(ErrorCode::NotAuthenticated));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_log_head_follows_key_rotation() {
    let node = Node::start();
    drop(node.client("alice", "alice").await);
    let before = latest_head(&node).await;
    node.process().admin_post("/admin/keys/rotate").unwrap();
    let after = latest_head(&node).await;
    assert_eq!(after.size, before.size);
    assert_eq!(after.root, before.root);
    assert_ne!(
        after.kid, before.kid,
        "the head is signed again with the new key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_file_is_not_replaced() {
    let mut node = Node::start();
    drop(node.client("alice", "alice").await);
    node.stop();
    let secret = node.data().join("signing-key-secret");
    std::fs::remove_file(&secret).unwrap();
    let started = NodeProcess::start(Path::new(BIN), &node.data(), &[]);
    assert!(
        started.is_err(),
        "the node started without its signing key secret"
    );
    assert!(
        !secret.exists(),
        "the node wrote a new secret over sealed keys"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_connections_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(
        Path::new(BIN),
        &dir.path().join("node"),
        &["--max-unauthenticated", "2"],
    )
    .unwrap();
    let trust = ServerTrust::fingerprint(&node.fingerprint).unwrap();
    let (first, _) = RawConnection::open(&node.url(), &trust).await.unwrap();
    let (second, _) = RawConnection::open(&node.url(), &trust).await.unwrap();
    assert!(matches!(
        first.request(ClientBody::KtHead).await.unwrap(),
        ServerBody::KtHead(_)
    ));
    let third = RawConnection::open(&node.url(), &trust).await;
    let Err(refused) = third else {
        panic!("a third connection was allowed to wait");
    };
    assert!(refused.to_string().contains("close code 1013"), "{refused}");
    drop(first);
    drop(second);
    // Once the others are gone, a new connection may wait again.
    let mut accepted = false;
    for _ in 0..50 {
        let (conn, _) = RawConnection::open(&node.url(), &trust).await.unwrap();
        if matches!(
            conn.request(ClientBody::KtHead).await,
            Ok(ServerBody::KtHead(_))
        ) {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        accepted,
        "new connections stay refused after the others closed"
    );
}
