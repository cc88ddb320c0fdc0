//! Group actors under their supervisor: restart after a crash, idle stop, pushes after
//! durability. Real sled storage and real openmls messages; no network.

use atlas_actors::{
    ActorMetrics, Deliver, GroupError, GroupMsg, GroupSettings, GroupSupervisor, Keyring,
    ReceiptSigning, Submission, SupervisorArgs, SupervisorMsg, create_group,
};
use atlas_protocol::{Accepted, ClientMsgId, DeviceId, GroupId};
use atlas_storage::Store;
use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use ractor::{Actor, ActorRef};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

#[derive(Default)]
struct Recorder(Mutex<Vec<(Vec<DeviceId>, usize)>>);

impl Deliver for Recorder {
    fn push(&self, devices: &[DeviceId], frame: bytes::Bytes) {
        self.0.lock().unwrap().push((devices.to_vec(), frame.len()));
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    supervisor: ActorRef<SupervisorMsg>,
    store: Store,
    group: GroupId,
    device: DeviceId,
    message: Vec<u8>,
    recorder: Arc<Recorder>,
}

async fn fixture(settings: GroupSettings) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let provider = OpenMlsRustCrypto::default();
    let signer = SignatureKeyPair::new(SUITE.signature_algorithm()).unwrap();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(b"alice".to_vec()).into(),
        signature_key: signer.public().into(),
    };
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(SUITE)
        .use_ratchet_tree_extension(true)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build();
    let mut mls_group = MlsGroup::new_with_group_id(
        &provider,
        &signer,
        &config,
        openmls::group::GroupId::from_slice(b"room"),
        credential,
    )
    .unwrap();
    let info = mls_group
        .export_group_info(provider.crypto(), &signer, true)
        .unwrap()
        .tls_serialize_detached()
        .unwrap();
    let group = GroupId::new(b"room".to_vec()).unwrap();
    let device = DeviceId::for_key(signer.public());
    create_group(&store, &group, &info, &device).await.unwrap();
    let message = mls_group
        .create_message(&provider, &signer, b"hello")
        .unwrap()
        .tls_serialize_detached()
        .unwrap();

    let recorder = Arc::new(Recorder::default());
    let keyring = Keyring::open(store.clone(), &[9; 32], Duration::from_secs(3600)).unwrap();
    let args = SupervisorArgs {
        store: store.clone(),
        keyring: Arc::new(keyring),
        deliver: recorder.clone(),
        settings,
        metrics: ActorMetrics::unregistered(),
    };
    let (supervisor, _) = Actor::spawn(None, GroupSupervisor, args).await.unwrap();
    Fixture {
        _dir: dir,
        supervisor,
        store,
        group,
        device,
        message,
        recorder,
    }
}

async fn lookup(f: &Fixture) -> ActorRef<GroupMsg> {
    let group = f.group.clone();
    ractor::call!(f.supervisor, |reply| SupervisorMsg::Lookup { group, reply })
        .unwrap()
        .unwrap()
}

async fn submit(f: &Fixture, id: u8) -> Result<Accepted, GroupError> {
    let actor = lookup(f).await;
    let submission = Submission::Application {
        message: f.message.clone(),
    };
    let sender = f.device;
    ractor::call!(actor, |reply| GroupMsg::Submit {
        signing: ReceiptSigning::Sign,
        sender,
        msg_id: ClientMsgId([id; 16]),
        submission,
        reply,
    })
    .unwrap()
}

async fn actors_alive(f: &Fixture) -> usize {
    ractor::call!(f.supervisor, SupervisorMsg::Count).unwrap()
}

#[tokio::test]
async fn killed_actor_restarts_from_storage() {
    let f = fixture(GroupSettings::default()).await;
    assert_eq!(submit(&f, 1).await.unwrap().seq, 1);
    let first = lookup(&f).await;
    first.kill();
    for _ in 0..100 {
        if actors_alive(&f).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        actors_alive(&f).await,
        0,
        "supervisor did not notice the crash"
    );

    // A fresh actor continues the sequence and still finds the first message id.
    assert_eq!(submit(&f, 2).await.unwrap().seq, 2);
    assert_ne!(lookup(&f).await.get_id(), first.get_id());
    let retry = submit(&f, 1).await.unwrap();
    assert_eq!((retry.seq, retry.duplicate), (1, true));
}

#[tokio::test]
async fn idle_actor_stops() {
    let settings = GroupSettings {
        idle_timeout: Duration::from_millis(100),
        tick_interval: Duration::from_millis(50),
        ..GroupSettings::default()
    };
    let f = fixture(settings).await;
    submit(&f, 1).await.unwrap();
    assert_eq!(actors_alive(&f).await, 1);
    let mut stopped = false;
    for _ in 0..100 {
        if actors_alive(&f).await == 0 {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stopped, "idle actor still running");
    assert_eq!(submit(&f, 2).await.unwrap().seq, 2);
}

#[tokio::test]
async fn sender_gets_no_push_of_its_own_message() {
    let f = fixture(GroupSettings::default()).await;
    submit(&f, 1).await.unwrap();
    let pushes = f.recorder.0.lock().unwrap().clone();
    assert_eq!(pushes.len(), 1);
    assert!(
        pushes[0].0.is_empty(),
        "the only member is the sender: {pushes:?}"
    );
}

#[tokio::test]
async fn non_member_submission_is_refused_and_not_stored() {
    let f = fixture(GroupSettings::default()).await;
    let actor = lookup(&f).await;
    let submission = Submission::Application {
        message: f.message.clone(),
    };
    let result = ractor::call!(actor, |reply| GroupMsg::Submit {
        signing: ReceiptSigning::Sign,
        sender: DeviceId::from_bytes([9; 16]),
        msg_id: ClientMsgId([3; 16]),
        submission,
        reply,
    })
    .unwrap();
    assert!(
        matches!(result, Err(GroupError::NotMember(..))),
        "{result:?}"
    );
    assert_eq!(submit(&f, 4).await.unwrap().seq, 1);
}

#[tokio::test]
async fn acknowledged_entries_are_removed_by_retention() {
    let settings = GroupSettings {
        tick_interval: Duration::from_millis(50),
        ..GroupSettings::default()
    };
    let f = fixture(settings).await;
    for id in 1..=3 {
        submit(&f, id).await.unwrap();
    }
    let actor = lookup(&f).await;
    let device = f.device;
    let stored = ractor::call!(actor, |reply| GroupMsg::Ack {
        device,
        seq: 2,
        reply
    })
    .unwrap()
    .unwrap();
    assert_eq!(stored, 2);

    let mut page = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let actor = lookup(&f).await;
        let result = ractor::call!(actor, |reply| GroupMsg::Sync {
            device,
            after: 0,
            limit: 10,
            reply
        })
        .unwrap()
        .unwrap();
        if result.first_available == 3 {
            page = Some(result);
            break;
        }
    }
    let page = page.expect("retention did not remove the acknowledged entries");
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![3], "only the unacknowledged entry stays");
    assert_eq!(page.head, 3);
}

/// Sends a sync for `f.device` from sequence number `after` to the group's actor.
async fn sync_page(f: &Fixture, after: u64) -> atlas_actors::SyncPage {
    let device = f.device;
    let actor = lookup(f).await;
    ractor::call!(actor, |reply| GroupMsg::Sync {
        device,
        after,
        limit: 10,
        reply
    })
    .unwrap()
    .unwrap()
}

fn entry_seqs(page: &atlas_actors::SyncPage) -> Vec<u64> {
    page.entries.iter().map(|e| e.seq).collect()
}

#[tokio::test]
async fn prune_applied_from_elsewhere_shows_in_sync() {
    let f = fixture(GroupSettings::default()).await;
    for id in 1..=3 {
        submit(&f, id).await.unwrap();
    }
    assert_eq!(sync_page(&f, 0).await.first_available, 1);

    // On a node of a cluster, another node's prune reaches the store through the replicated
    // log (or a snapshot), not through this node's actor, which stays loaded.
    let prune = atlas_storage::Change::Prune {
        group: f.group.clone(),
        through_seq: 2,
    };
    f.store.apply(&prune).unwrap();

    // A device that read up to 2 checks that entry 2 is returned again whenever the node
    // reports it available, so a stale first number looks like a lost entry.
    let page = sync_page(&f, 1).await;
    assert_eq!(entry_seqs(&page), vec![3]);
    assert_eq!(
        page.first_available, 3,
        "the actor reported a pruned entry as available"
    );
}

#[tokio::test]
async fn entries_stored_past_the_actor_show_in_sync() {
    let f = fixture(GroupSettings::default()).await;
    for id in 1..=3 {
        submit(&f, id).await.unwrap();
    }
    assert_eq!(sync_page(&f, 0).await.head, 3);

    // A snapshot installed on a node of a cluster writes entries into the store without
    // passing them to the loaded actor.
    let mut entry = f.store.entry(&f.group, 3).unwrap().unwrap();
    entry.seq = 4;
    entry.msg_id = ClientMsgId([40; 16]);
    let append = atlas_storage::Change::AppendBatch {
        group: f.group.clone(),
        items: vec![atlas_storage::AppendItem {
            entry,
            meta: None,
            public_state: None,
            welcomes: Vec::new(),
            departed: Vec::new(),
        }],
    };
    f.store.apply(&append).unwrap();

    // A device that read entry 4 through another node must find it here too.
    let page = sync_page(&f, 3).await;
    assert_eq!(entry_seqs(&page), vec![4]);
    assert_eq!(
        page.head, 4,
        "the actor reported a log that ends before entry 4"
    );
}

#[tokio::test]
async fn entries_past_the_ttl_are_removed_unacknowledged() {
    let settings = GroupSettings {
        tick_interval: Duration::from_millis(50),
        retention_ttl: Duration::from_millis(1),
        ..GroupSettings::default()
    };
    let f = fixture(settings).await;
    for id in 1..=3 {
        submit(&f, id).await.unwrap();
    }
    let device = f.device;
    let mut removed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let actor = lookup(&f).await;
        let page = ractor::call!(actor, |reply| GroupMsg::Sync {
            device,
            after: 0,
            limit: 10,
            reply
        })
        .unwrap()
        .unwrap();
        if page.entries.is_empty() {
            assert_eq!(page.first_available, 4);
            assert_eq!(page.head, 3);
            removed = true;
            break;
        }
    }
    assert!(removed, "entries older than the TTL were kept");
    // Sequence numbers continue after retention, also in an actor that loads the group from
    // storage with every entry removed.
    lookup(&f).await.kill();
    for _ in 0..100 {
        if actors_alive(&f).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(actors_alive(&f).await, 0, "the actor did not stop");
    assert_eq!(submit(&f, 9).await.unwrap().seq, 4);
}

#[tokio::test]
async fn retry_is_answered_after_the_original() {
    let f = fixture(GroupSettings::default()).await;
    let actor = lookup(&f).await;
    let submit_with = |id: u8| {
        let (tx, rx) = ractor::concurrency::oneshot();
        let message = GroupMsg::Submit {
            signing: ReceiptSigning::Sign,
            sender: f.device,
            msg_id: ClientMsgId([id; 16]),
            submission: Submission::Application {
                message: f.message.clone(),
            },
            reply: tx.into(),
        };
        actor.send_message(message).unwrap();
        rx
    };
    let mut original = submit_with(7);
    let retry = submit_with(7);
    let retry = retry.await.unwrap().unwrap();
    assert!(retry.duplicate);
    // The retry's acknowledgement may not overtake the original's, which waits for the flush.
    let original = original
        .try_recv()
        .expect("retry answered before the original")
        .unwrap();
    assert_eq!((original.seq, original.duplicate), (retry.seq, false));
}
