use super::*;
use atlas_protocol::EntryKind;
use atlas_protocol::transparency::{
    Authorization, ConsistencyProof, Jwk, Jwks, KeyEvent, KeyEventKind, ProvenEntry,
    SignedTreeHead, wire_path,
};

fn group() -> GroupId {
    GroupId::new(b"group-a".to_vec()).unwrap()
}

fn entry(seq: u64, msg: u8) -> LogEntry {
    LogEntry {
        seq,
        kind: EntryKind::Application,
        epoch: 1,
        sender: DeviceId::from_bytes([1; 16]),
        msg_id: ClientMsgId([msg; 16]),
        accepted_at_ms: 1000 * seq,
        payload: vec![seq as u8; 10],
    }
}

fn meta(last_seq: u64) -> GroupMeta {
    GroupMeta {
        epoch: 1,
        last_seq,
        first_seq: 1,
        created_at_ms: 0,
    }
}

#[tokio::test]
async fn appended_entries_read_back_in_order_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.create_group(&group(), &meta(0), b"state").unwrap();
        for seq in 1..=5 {
            store
                .append(
                    &group(),
                    &entry(seq, seq as u8),
                    Some(&meta(seq)),
                    None,
                    &[],
                    &[],
                )
                .unwrap();
        }
        store.durable().await.unwrap();
        store.close().await.unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let (m, state) = store.load_group(&group()).unwrap().unwrap();
    assert_eq!(m.last_seq, 5);
    assert_eq!(state, b"state");
    assert_eq!(read_seqs(&store, 2), [3, 4, 5]);
    assert_eq!(
        store
            .dedupe(
                &group(),
                &DeviceId::from_bytes([1; 16]),
                &ClientMsgId([4; 16])
            )
            .unwrap(),
        Some(4)
    );
}

#[tokio::test]
async fn creating_a_group_twice_fails() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.create_group(&group(), &meta(0), b"a").unwrap();
    let err = store.create_group(&group(), &meta(0), b"b").unwrap_err();
    assert!(matches!(err, StorageError::GroupExists(_)), "{err}");
    assert_eq!(store.load_group(&group()).unwrap().unwrap().1, b"a");
}

#[tokio::test]
async fn format_version_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(FORMAT_KEY, &99u32.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
        drop(db);
    }
    let err = Store::open(dir.path()).err().expect("open must fail");
    assert!(
        matches!(
            err,
            StorageError::FormatVersion {
                found: 99,
                expected: FORMAT_VERSION
            }
        ),
        "{err}"
    );
}

/// Set by [`database_cut_inside_a_segment_is_an_error`] for the copy of itself that builds and
/// opens the damaged databases.
const CUT_DATABASE_CHILD: &str = "ATLAS_TEST_CUT_DATABASE_CHILD";

#[tokio::test]
async fn database_cut_inside_a_segment_is_an_error() {
    // sled's panics while opening leave its shared threads and the files' locks in a state
    // that breaks other tests of the same process, so a child process builds the databases
    // and opens the cut copies.
    if std::env::var_os(CUT_DATABASE_CHILD).is_some() {
        open_cut_databases().await;
        return;
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "tests::database_cut_inside_a_segment_is_an_error",
            "--exact",
            "--nocapture",
        ])
        .env(CUT_DATABASE_CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the child failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("cut opened with an error after a sled panic"),
        "no cut of any database made sled panic, so the test checks nothing new: {stdout}"
    );
}

/// Builds databases and opens copies of each cut at many points, in the child process.
/// Panics on any outcome other than a store, a damaged-database error or a corruption error.
/// Which cuts make sled panic depends on the timing of its flushes, so databases of other
/// entry sizes follow until one cut does.
async fn open_cut_databases() {
    for (attempt, payload_len) in [1000, 700, 1500, 400, 2200].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.create_group(&group(), &meta(0), b"state").unwrap();
        for seq in 1..=3_000_000 / payload_len as u64 {
            let mut entry = entry(seq, seq as u8);
            entry.payload = vec![seq as u8; payload_len];
            store
                .append(&group(), &entry, None, None, &[], &[])
                .unwrap();
        }
        store.close().await.unwrap();
        let panics = open_cut_copies(dir.path());
        println!("database {attempt}: {panics} cuts made sled panic");
        if panics > 0 {
            return;
        }
    }
}

/// Opens copies of the database in `dir` cut at many points; returns how many of them made
/// sled panic.
fn open_cut_copies(dir: &Path) -> usize {
    let whole = std::fs::read(dir.join("db")).unwrap();
    let mut panics = 0;
    // sled 0.34 panics while opening some of these files. A panic leaves the file locked in
    // this process, so each cut gets a directory of its own.
    for cut in (1..whole.len() / 65_536).map(|i| i * 65_536 + 4096) {
        let copy = tempfile::tempdir().unwrap();
        std::fs::write(copy.path().join("db"), &whole[..cut]).unwrap();
        match Store::open(copy.path()) {
            Ok(store) => drop(store),
            Err(StorageError::Open { detail, .. }) if detail.contains("sled failed") => {
                assert!(detail.contains("restore"), "cut at {cut}: {detail}");
                println!("cut opened with an error after a sled panic: {cut}");
                panics += 1;
            }
            Err(e) => assert!(
                matches!(e, StorageError::Open { .. } | StorageError::Corrupt { .. }),
                "cut at {cut}: {e:?}"
            ),
        }
    }
    panics
}

#[tokio::test]
async fn lost_writes_behind_a_durability_mark_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mark_file = dir.path().join("durable-mark");
    {
        let store = Store::open(dir.path()).unwrap();
        store.create_group(&group(), &meta(0), b"state").unwrap();
        // Every flush records a new mark before its waiters are released, not only clean stops.
        let mut previous = 0;
        for seq in 1..=3 {
            store
                .append(&group(), &entry(seq, 1), None, None, &[], &[])
                .unwrap();
            store.durable().await.unwrap();
            let recorded = recorded_mark(&mark_file);
            assert!(recorded > previous, "mark {recorded} after {previous}");
            previous = recorded;
        }
        store.close().await.unwrap();
    }
    // A clean stop and a reopen agree.
    Store::open(dir.path()).unwrap().close().await.unwrap();
    let recorded = recorded_mark(&mark_file);
    assert!(recorded >= 5, "mark {recorded}");
    // As if sled had recovered its log only up to an earlier mark.
    {
        let db = sled::open(dir.path()).unwrap();
        marks::set_stored_mark(&db.open_tree("meta").unwrap(), recorded - 1);
        db.flush().unwrap();
    }
    let err = Store::open(dir.path()).err().expect("open must fail");
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("lost writes"), "{err}");

    // Without the file, a lost write could not be detected, so the database is refused too.
    std::fs::remove_file(&mark_file).unwrap();
    let err = Store::open(dir.path()).err().expect("open must fail");
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("is missing"), "{err}");
    // Writing the database's mark back into the file, as the error message suggests, opens it again.
    std::fs::write(&mark_file, format!("{}\n", recorded - 1)).unwrap();
    Store::open(dir.path()).unwrap().close().await.unwrap();
}

#[tokio::test]
async fn new_database_gets_a_mark_file() {
    let dir = tempfile::tempdir().unwrap();
    let _store = Store::open(dir.path()).unwrap();
    assert_eq!(recorded_mark(&dir.path().join("durable-mark")), 0);
}

fn recorded_mark(file: &Path) -> u64 {
    let text = std::fs::read_to_string(file).unwrap();
    text.trim().parse().unwrap()
}

#[tokio::test]
async fn second_open_reports_directory_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path())
        .err()
        .expect("second open must fail");
    assert!(matches!(err, StorageError::InUse { .. }), "{err:?}");
    assert!(err.to_string().contains("another process uses it"), "{err}");
}

#[tokio::test]
async fn corrupt_log_entry_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .groups
        .insert(keys::log(&group(), 1), &b"\xc1garbage"[..])
        .unwrap();
    let err = store.read_log(&group(), 0, 10).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
}

/// Opens a store in `dir` with the test group and its entries 1 to `count`.
fn store_with_entries(dir: &Path, count: u64) -> Store {
    let store = Store::open(dir).unwrap();
    store.create_group(&group(), &meta(0), b"state").unwrap();
    for seq in 1..=count {
        store
            .append(&group(), &entry(seq, seq as u8), None, None, &[], &[])
            .unwrap();
    }
    store
}

#[tokio::test]
async fn missing_log_entry_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_entries(dir.path(), 5);
    // As if sled had lost one entry of a damaged tree.
    store.groups.remove(keys::log(&group(), 3)).unwrap();

    for after in [0, 2] {
        let err = store.read_log(&group(), after, 10).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("entry 3 is missing"), "{err}");
    }
    // Reads that end before the gap, or start after it, are whole.
    assert_eq!(store.read_log(&group(), 0, 2).unwrap().len(), 2);
    assert_eq!(store.read_log(&group(), 3, 10).unwrap().len(), 2);
    // Entries removed by retention are no gap.
    store
        .prune(
            &group(),
            3,
            &GroupMeta {
                first_seq: 4,
                ..meta(5)
            },
        )
        .unwrap();
    assert_eq!(read_seqs(&store, 0), [4, 5]);
}

/// Returns the sequence numbers of the test group's entries after `after`, at most 10.
fn read_seqs(store: &Store, after: u64) -> Vec<u64> {
    let entries = store.read_log(&group(), after, 10).unwrap();
    entries.iter().map(|e| e.seq).collect()
}

#[tokio::test]
async fn one_time_key_package_is_claimed_once_then_last_resort() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let device = DeviceId::from_bytes([7; 16]);
    let record = |id: u8, not_after: u64, last_resort: bool| KeyPackageRecord {
        hash_ref: vec![id],
        bytes: vec![id; 4],
        not_before: 0,
        not_after,
        last_resort,
        device,
    };
    let available = store
        .put_key_packages(
            &device,
            &[record(1, 100, false), record(2, 10, false)],
            Some(&record(9, 100, true)),
        )
        .unwrap();
    assert_eq!(available, 2);

    let first = store.claim_key_package(&device, 50).unwrap().unwrap();
    assert_eq!(first.hash_ref, vec![1]);
    // The only other one-time KeyPackage expired at 10, so the last-resort one comes next.
    let second = store.claim_key_package(&device, 50).unwrap().unwrap();
    assert!(second.last_resort);
    let third = store.claim_key_package(&device, 50).unwrap().unwrap();
    assert!(third.last_resort);
    // An expired last-resort KeyPackage is never handed out.
    assert!(store.claim_key_package(&device, 200).unwrap().is_none());
}

#[tokio::test]
async fn prune_removes_entries_and_dedupe_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.create_group(&group(), &meta(0), b"s").unwrap();
    for seq in 1..=4 {
        store
            .append(
                &group(),
                &entry(seq, seq as u8),
                Some(&meta(seq)),
                None,
                &[],
                &[],
            )
            .unwrap();
    }
    assert_eq!(store.last_seq_before(&group(), 2500).unwrap(), Some(2));
    let removed = store
        .prune(
            &group(),
            2,
            &GroupMeta {
                first_seq: 3,
                ..meta(4)
            },
        )
        .unwrap();
    assert_eq!(removed, 2);
    assert_eq!(store.read_log(&group(), 0, 10).unwrap().len(), 2);
    assert_eq!(
        store
            .dedupe(
                &group(),
                &DeviceId::from_bytes([1; 16]),
                &ClientMsgId([1; 16])
            )
            .unwrap(),
        None
    );
    assert_eq!(store.load_group(&group()).unwrap().unwrap().0.first_seq, 3);
}

#[tokio::test]
async fn cursor_only_moves_forward() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let device = DeviceId::from_bytes([2; 16]);
    assert_eq!(store.advance_cursor(&device, &group(), 5).unwrap(), 5);
    assert_eq!(store.advance_cursor(&device, &group(), 3).unwrap(), 5);
    assert_eq!(store.cursor(&device, &group()).unwrap(), 5);
}

fn device(seed: u8, account: &str) -> DeviceRecord {
    DeviceRecord {
        device: DeviceId::from_bytes([seed; 16]),
        account: account.into(),
        public_key: vec![seed; 32],
        registered_at_ms: 1,
        kt_index: None,
        revoked_at_ms: None,
    }
}

fn key_event(kind: KeyEventKind, record: &DeviceRecord) -> KeyEvent {
    KeyEvent {
        kind,
        account: record.account.clone(),
        device: record.device,
        key: record.public_key.clone(),
        time_ms: 1,
        authorization: Authorization::DeviceSignature {
            signer: record.device,
            signature: vec![0; 64],
        },
    }
}

/// Registers the first device of an account, and enrolls later ones on behalf of the first.
fn register(store: &Store, record: &DeviceRecord) -> Result<KeyEventOutcome, StorageError> {
    let change = match store.account_devices(&record.account)?.first() {
        Some(first) if first.device != record.device => DirectoryChange::Enroll {
            signer: first.device,
            record: record.clone(),
        },
        _ => DirectoryChange::Register(record.clone()),
    };
    store.append_key_event(&key_event(KeyEventKind::Added, record), &change)
}

#[tokio::test]
async fn device_key_cannot_move_to_another_account() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let record = device(3, "alice");
    assert!(matches!(
        register(&store, &record).unwrap(),
        KeyEventOutcome::Appended { index: 0, .. }
    ));
    assert!(matches!(
        register(&store, &record).unwrap(),
        KeyEventOutcome::AlreadyRegistered(_)
    ));
    let stolen = DeviceRecord {
        account: "mallory".into(),
        ..record
    };
    assert!(matches!(
        register(&store, &stolen),
        Err(StorageError::DeviceOwnedElsewhere { .. })
    ));
    assert_eq!(store.account_devices("alice").unwrap().len(), 1);
    assert!(store.account_devices("mallory").unwrap().is_empty());
    assert_eq!(store.kt_size(), 1, "refused registrations append nothing");
}

#[tokio::test]
async fn key_log_survives_reopen_with_same_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = {
        let store = Store::open(dir.path()).unwrap();
        for seed in 0..10 {
            register(&store, &device(seed, "bob")).unwrap();
        }
        store.close().await.unwrap();
        store.kt_root(10).unwrap()
    };
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.kt_size(), 10);
    assert_eq!(store.kt_root(10).unwrap(), root);
    assert_eq!(
        store.kt_account_entries("bob").unwrap(),
        (0..10).collect::<Vec<_>>()
    );
    let leaf = store.kt_leaf(4).unwrap();
    assert_eq!(
        KeyEvent::from_leaf(&leaf).unwrap().device,
        DeviceId::from_bytes([4; 16])
    );
}

/// Merkle tree hash of `leaves` as RFC 9162 defines it, computed apart from
/// the log's own code.
fn rfc9162_root(leaves: &[Vec<u8>]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    if let [leaf] = leaves {
        return Sha256::new()
            .chain_update([0u8])
            .chain_update(leaf)
            .finalize()
            .into();
    }
    let split = leaves.len().next_power_of_two() / 2;
    Sha256::new()
        .chain_update([1u8])
        .chain_update(rfc9162_root(&leaves[..split]))
        .chain_update(rfc9162_root(&leaves[split..]))
        .finalize()
        .into()
}

#[tokio::test]
async fn key_log_roots_match_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    // Each open starts without the newest subtree hashes, so the appends after it read them
    // from storage until they have recorded their own.
    for (first, last) in [(0u8, 23u8), (23, 41), (41, 70)] {
        let store = Store::open(dir.path()).unwrap();
        for seed in first..last {
            register(&store, &device(seed, &format!("user{seed}"))).unwrap();
        }
        store.close().await.unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let leaves: Vec<Vec<u8>> = (0..70).map(|i| store.kt_leaf(i).unwrap()).collect();
    for size in 1..=70 {
        assert_eq!(
            store.kt_root(size as u64).unwrap(),
            rfc9162_root(&leaves[..size]),
            "root of size {size}"
        );
    }
}

#[tokio::test]
async fn key_log_proofs_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for seed in 0..13 {
        register(&store, &device(seed, "carol")).unwrap();
    }
    let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let jwks = Jwks {
        keys: vec![Jwk::ed25519("k", &key.verifying_key())],
    };
    let old = SignedTreeHead::sign(5, store.kt_root(5).unwrap(), 1, "k", &key);
    let new = SignedTreeHead::sign(13, store.kt_root(13).unwrap(), 2, "k", &key);
    assert!(new.verify(&jwks, 3).is_ok());
    let proof = ProvenEntry {
        index: 7,
        leaf: store.kt_leaf(7).unwrap(),
        tree_size: 13,
        path: wire_path(store.kt_inclusion(7, 13).unwrap()),
    };
    assert_eq!(
        proof.verify(&new).unwrap().device,
        DeviceId::from_bytes([7; 16])
    );
    let consistency = ConsistencyProof {
        from: 5,
        to: 13,
        path: wire_path(store.kt_consistency(5, 13).unwrap()),
    };
    assert_eq!(consistency.verify(&old, &new), Ok(()));
    store.put_tree_head(&old).unwrap();
    store.put_tree_head(&new).unwrap();
    assert_eq!(store.latest_tree_head().unwrap(), Some(new));
    assert_eq!(store.tree_head(5).unwrap(), Some(old));
}

#[tokio::test]
async fn revoke_and_rotate_update_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let first = device(1, "dave");
    let second = device(2, "dave");
    register(&store, &first).unwrap();
    register(&store, &second).unwrap();

    let rotated = device(3, "dave");
    let outcome = store
        .append_key_event(
            &key_event(KeyEventKind::Rotated, &rotated),
            &DirectoryChange::Rotate {
                previous: first.device,
                new: rotated.clone(),
            },
        )
        .unwrap();
    assert!(matches!(
        outcome,
        KeyEventOutcome::Appended { index: 2, .. }
    ));
    let old = store.device(&first.device).unwrap().unwrap();
    assert!(old.revoked_at_ms.is_some());
    assert_eq!(
        store.device(&rotated.device).unwrap().unwrap().kt_index,
        Some(2)
    );

    store
        .append_key_event(
            &key_event(KeyEventKind::Revoked, &second),
            &DirectoryChange::Revoke {
                device: second.device,
                signer: rotated.device,
                at_ms: 5,
            },
        )
        .unwrap();
    let current: Vec<DeviceId> = store
        .account_devices("dave")
        .unwrap()
        .into_iter()
        .map(|d| d.device)
        .collect();
    assert_eq!(current, vec![rotated.device]);

    let again = store.append_key_event(
        &key_event(KeyEventKind::Revoked, &second),
        &DirectoryChange::Revoke {
            device: second.device,
            signer: rotated.device,
            at_ms: 6,
        },
    );
    assert!(matches!(again, Err(StorageError::DeviceRevoked(_))));
    assert!(matches!(
        register(&store, &first),
        Err(StorageError::DeviceRevoked(_))
    ));
    assert_eq!(store.kt_size(), 4);
    assert_eq!(store.kt_account_entries("dave").unwrap(), vec![0, 1, 2, 3]);
}

#[tokio::test]
async fn existing_account_needs_enrollment() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let first = device(1, "frank");
    register(&store, &first).unwrap();
    let intruder = device(2, "frank");
    let taken = store.append_key_event(
        &key_event(KeyEventKind::Added, &intruder),
        &DirectoryChange::Register(intruder.clone()),
    );
    assert!(
        matches!(taken, Err(StorageError::AccountTaken(_))),
        "{taken:?}"
    );
    assert_eq!(store.kt_size(), 1);

    // An enrollment must come from an active device of the same account.
    let stranger = device(3, "grace");
    register(&store, &stranger).unwrap();
    let foreign = store.append_key_event(
        &key_event(KeyEventKind::Added, &intruder),
        &DirectoryChange::Enroll {
            signer: stranger.device,
            record: intruder.clone(),
        },
    );
    assert!(matches!(
        foreign,
        Err(StorageError::DeviceOwnedElsewhere { .. })
    ));
    assert_eq!(store.kt_size(), 2);
}

#[tokio::test]
async fn revoked_signer_cannot_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (a, b) = (device(1, "heidi"), device(2, "heidi"));
    register(&store, &a).unwrap();
    register(&store, &b).unwrap();
    let revoke = |target: &DeviceRecord, signer: &DeviceRecord| {
        store.append_key_event(
            &key_event(KeyEventKind::Revoked, target),
            &DirectoryChange::Revoke {
                device: target.device,
                signer: signer.device,
                at_ms: 9,
            },
        )
    };
    revoke(&a, &a).unwrap();
    assert!(matches!(
        revoke(&b, &a),
        Err(StorageError::DeviceRevoked(_))
    ));
    assert_eq!(store.account_devices("heidi").unwrap().len(), 1);
}

#[tokio::test]
async fn corrupt_key_log_entry_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for seed in 0..3 {
        register(&store, &device(seed, "erin")).unwrap();
    }
    let mut entry_key = vec![b'e'];
    entry_key.extend_from_slice(&1u64.to_be_bytes());
    store.kt.insert(entry_key, b"tampered".to_vec()).unwrap();
    assert!(matches!(
        store.kt_leaf(1),
        Err(StorageError::Corrupt { .. })
    ));
    assert!(store.kt_leaf(2).is_ok());
}

#[tokio::test]
async fn last_seq_comes_from_the_log_when_meta_was_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_entries(dir.path(), 3);
    assert_eq!(store.load_group(&group()).unwrap().unwrap().0.last_seq, 3);
}

#[tokio::test]
async fn unreadable_database_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("db"), vec![0x5a; 4096]).unwrap();
    let err = Store::open(dir.path()).err().expect("open must fail");
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    // NOTE: sled rewrites a file it cannot read while opening it, so the bytes are not kept.
    // The check guarantees only that the node does not start as if it had no data.
    let again = Store::open(dir.path())
        .err()
        .expect("second open must fail too");
    assert!(matches!(again, StorageError::Corrupt { .. }), "{again}");
}

fn account_record(name: &str) -> AccountRecord {
    AccountRecord {
        account: name.into(),
        user_id: [7; 16],
        created_ms: 1,
        passkeys: vec![PasskeyRecord {
            credential_id: vec![1, 2, 3],
            passkey: b"{}".to_vec(),
            created_ms: 1,
            last_used_ms: None,
        }],
    }
}

#[tokio::test]
async fn account_names_are_taken_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.create_account(&account_record("alice")).unwrap();
    assert!(matches!(
        store.create_account(&account_record("alice")),
        Err(StorageError::AccountTaken(_))
    ));
    // Open registration cannot take a passkey account's name.
    assert!(matches!(
        register(&store, &device(1, "alice")),
        Err(StorageError::AccountTaken(_))
    ));
    // Nor can a passkey account take a name that has devices.
    register(&store, &device(2, "bob")).unwrap();
    let mut bob = account_record("bob");
    bob.passkeys[0].credential_id = vec![9];
    assert!(matches!(
        store.create_account(&bob),
        Err(StorageError::AccountTaken(_))
    ));
    // Token enrollment needs the account record.
    let change = DirectoryChange::EnrollByToken(device(3, "carol"));
    let event = key_event(KeyEventKind::Added, &device(3, "carol"));
    assert!(matches!(
        store.append_key_event(&event, &change),
        Err(StorageError::UnknownAccount(_))
    ));
    let change = DirectoryChange::EnrollByToken(device(4, "alice"));
    let event = key_event(KeyEventKind::Added, &device(4, "alice"));
    assert!(matches!(
        store.append_key_event(&event, &change).unwrap(),
        KeyEventOutcome::Appended { .. }
    ));
}

fn family(account: &str) -> TokenFamily {
    TokenFamily {
        account: account.into(),
        created_ms: 1,
        revoked_ms: None,
        credential_id: vec![1, 2, 3],
        auth_time_ms: 1,
    }
}

#[tokio::test]
async fn credential_logins_revoked_together() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let record = RefreshRecord {
        account: "alice".into(),
        jkt: "key".into(),
        family: [8; 16],
        expires_ms: 10_000,
        spent_ms: None,
    };
    store
        .put_refresh_token(&[1; 32], &record, &family("alice"))
        .unwrap();
    let other = RefreshRecord {
        family: [9; 16],
        ..record.clone()
    };
    let mut second = family("alice");
    second.credential_id = vec![4];
    store.put_refresh_token(&[2; 32], &other, &second).unwrap();
    assert_eq!(
        store
            .revoke_credential_logins("alice", &[1, 2, 3], 50)
            .unwrap(),
        1
    );
    assert!(
        store
            .token_family(&[8; 16])
            .unwrap()
            .unwrap()
            .revoked_ms
            .is_some()
    );
    assert!(
        store
            .token_family(&[9; 16])
            .unwrap()
            .unwrap()
            .revoked_ms
            .is_none()
    );
}

#[tokio::test]
async fn credential_registered_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.create_account(&account_record("alice")).unwrap();
    // The same credential for another account.
    assert!(matches!(
        store.create_account(&account_record("bob")),
        Err(StorageError::CredentialInUse)
    ));
    // Removing it from alice frees it.
    store
        .update_account("alice", |record| {
            record.passkeys.clear();
            Ok::<(), StorageError>(())
        })
        .unwrap();
    store.create_account(&account_record("bob")).unwrap();
}

#[tokio::test]
async fn refresh_reuse_revokes_family() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let first = RefreshRecord {
        account: "alice".into(),
        jkt: "key".into(),
        family: [5; 16],
        expires_ms: 10_000,
        spent_ms: None,
    };
    store
        .put_refresh_token(&[1; 32], &first, &family("alice"))
        .unwrap();
    let next = |spent: &RefreshRecord| RefreshRecord {
        spent_ms: None,
        ..spent.clone()
    };
    let RefreshOutcome::Rotated(second) = store
        .spend_refresh_token(&[1; 32], 100, &[2; 32], next)
        .unwrap()
    else {
        panic!("the first use rotates");
    };
    assert_eq!(second.family, [5; 16]);
    assert_eq!(
        store
            .spend_refresh_token(&[9; 32], 100, &[3; 32], next)
            .unwrap(),
        RefreshOutcome::Unknown
    );
    // Reusing the spent token revokes the family, so the newer token stops working too.
    assert_eq!(
        store
            .spend_refresh_token(&[1; 32], 200, &[3; 32], next)
            .unwrap(),
        RefreshOutcome::Reused { family: [5; 16] }
    );
    assert_eq!(
        store
            .spend_refresh_token(&[2; 32], 200, &[4; 32], next)
            .unwrap(),
        RefreshOutcome::Revoked
    );
    assert!(
        store
            .token_family(&[5; 16])
            .unwrap()
            .unwrap()
            .revoked_ms
            .is_some()
    );
}

#[tokio::test]
async fn refresh_expiry_and_pruning() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let record = RefreshRecord {
        account: "alice".into(),
        jkt: "key".into(),
        family: [6; 16],
        expires_ms: 1_000,
        spent_ms: None,
    };
    store
        .put_refresh_token(&[1; 32], &record, &family("alice"))
        .unwrap();
    let next = |spent: &RefreshRecord| spent.clone();
    assert_eq!(
        store
            .spend_refresh_token(&[1; 32], 1_000, &[2; 32], next)
            .unwrap(),
        RefreshOutcome::Expired
    );
    assert_eq!(store.prune_refresh_tokens(999).unwrap(), 0);
    assert_eq!(store.prune_refresh_tokens(1_000).unwrap(), 1);
    assert_eq!(
        store
            .spend_refresh_token(&[1; 32], 1_000, &[2; 32], next)
            .unwrap(),
        RefreshOutcome::Unknown
    );
}

#[tokio::test]
async fn fully_pruned_group_keeps_numbering() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.create_group(&group(), &meta(0), b"state").unwrap();
    // Application messages leave the meta record at last_seq 0.
    store
        .apply(&Change::AppendBatch {
            group: group(),
            items: vec![item(1, 1), item(2, 2), item(3, 3)],
        })
        .unwrap();
    store
        .apply(&Change::Prune {
            group: group(),
            through_seq: 3,
        })
        .unwrap();
    assert!(store.read_log(&group(), 0, 10).unwrap().is_empty());

    // An actor that loads the group now must number its next entry 4, the one storage takes.
    let (loaded, _) = store.load_group(&group()).unwrap().unwrap();
    assert_eq!((loaded.first_seq, loaded.last_seq), (4, 3));
    store
        .apply(&Change::AppendBatch {
            group: group(),
            items: vec![item(loaded.last_seq + 1, 4)],
        })
        .unwrap();
    assert_eq!(store.entry(&group(), 4).unwrap().unwrap().seq, 4);
}

fn item(seq: u64, msg: u8) -> AppendItem {
    AppendItem {
        entry: entry(seq, msg),
        meta: None,
        public_state: None,
        welcomes: Vec::new(),
        departed: Vec::new(),
    }
}

#[tokio::test]
async fn append_batch_rejects_taken_numbers_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.create_group(&group(), &meta(0), b"state").unwrap();
    let batch = |items: Vec<AppendItem>| Change::AppendBatch {
        group: group(),
        items,
    };
    store.apply(&batch(vec![item(1, 1), item(2, 2)])).unwrap();

    // A taken sequence number, a stored message id, and a batch that repeats itself are all
    // conflicts, and none of them stores any of its entries.
    let cases = [
        ("taken sequence number", vec![item(3, 3), item(2, 4)]),
        ("stored message id", vec![item(3, 3), item(4, 1)]),
        ("repeated message id", vec![item(3, 5), item(4, 5)]),
        ("repeated sequence number", vec![item(3, 6), item(3, 7)]),
    ];
    for (case, items) in cases {
        let result = store.apply(&batch(items));
        assert!(
            matches!(result, Err(StorageError::Conflict(_))),
            "{case}: {result:?}"
        );
        assert_eq!(store.entry(&group(), 3).unwrap(), None, "{case}");
    }
    store.apply(&batch(vec![item(3, 3), item(4, 4)])).unwrap();
    let seqs: Vec<u64> = store
        .read_log(&group(), 0, 10)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);

    // Retention removed entries 1 to 4: an owner with stale state cannot reuse their numbers,
    // and no entry may leave a gap.
    store
        .apply(&Change::Prune {
            group: group(),
            through_seq: 4,
        })
        .unwrap();
    for (case, seq) in [("removed number", 3), ("gap", 6)] {
        let result = store.apply(&batch(vec![item(seq, 20)]));
        assert!(
            matches!(result, Err(StorageError::Conflict(_))),
            "{case}: {result:?}"
        );
    }
    store.apply(&batch(vec![item(5, 20)])).unwrap();
    assert_eq!(store.entry(&group(), 5).unwrap().unwrap().seq, 5);
}

/// Returns the part of the shared state that the log of `group()`'s shard carries in these
/// tests. It also contains `group-c`, which only the target store has, and the KeyPackages
/// of devices 0 and 6.
fn shard_part() -> SharedPart {
    SharedPart::Shard(Arc::new(|id: &[u8]| {
        id == group().as_bytes() || id == b"group-c" || id == [0; 16] || id == [6; 16]
    }))
}

/// Returns a last-resort KeyPackage record of `device`, valid until time 100.
fn last_resort_of(device: DeviceId) -> KeyPackageRecord {
    KeyPackageRecord {
        hash_ref: device.as_bytes().to_vec(),
        bytes: vec![1; 4],
        not_before: 0,
        not_after: 100,
        last_resort: true,
        device,
    }
}

#[tokio::test]
async fn snapshot_of_a_part_replaces_only_that_part() {
    let source_dir = tempfile::tempdir().unwrap();
    let source = Store::open(source_dir.path()).unwrap();
    source.create_group(&group(), &meta(0), b"state").unwrap();
    let invited = DeviceId::from_bytes([8; 16]);
    let welcome = WelcomeEntry {
        group: group(),
        seq: 2,
        welcome: vec![4; 8],
    };
    let mut adds = item(2, 2);
    adds.welcomes = vec![(invited, welcome.clone())];
    source
        .apply(&Change::AppendBatch {
            group: group(),
            items: vec![item(1, 1), adds],
        })
        .unwrap();
    let reader = DeviceId::from_bytes([7; 16]);
    source
        .apply(&Change::Acknowledge {
            device: reader,
            group: group(),
            seq: 2,
        })
        .unwrap();
    for seed in 0..3 {
        register(&source, &device(seed, "dana")).unwrap();
    }
    let in_shard = DeviceId::from_bytes([0; 16]);
    source
        .put_key_packages(&in_shard, &[], Some(&last_resort_of(in_shard)))
        .unwrap();
    source.create_account(&account_record("erin")).unwrap();
    let node_keys = vec![NodeKey {
        kid: "kid-of-node-a".into(),
        public: [3; 32],
        until_ms: Some(5),
    }];
    source
        .apply(&Change::PublishNodeKeys {
            node: "node-a".into(),
            keys: node_keys.clone(),
        })
        .unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let source_head = SignedTreeHead::sign(3, source.kt_root(3).unwrap(), 1, "k", &key);
    source.put_tree_head(&source_head).unwrap();
    let groups = source.export_shared(&shard_part()).unwrap();
    let directory = source.export_shared(&SharedPart::Directory).unwrap();

    // The target has state of its own. The snapshots replace what lies in their parts. A group
    // and KeyPackages of another shard stay, and so does the target's own tree head, because
    // each node signs its own.
    let target_dir = tempfile::tempdir().unwrap();
    let target = Store::open(target_dir.path()).unwrap();
    let elsewhere = GroupId::new(b"group-b".to_vec()).unwrap();
    let replaced = GroupId::new(b"group-c".to_vec()).unwrap();
    target.create_group(&elsewhere, &meta(0), b"other").unwrap();
    target.create_group(&replaced, &meta(0), b"gone").unwrap();
    register(&target, &device(9, "fred")).unwrap();
    let replaced_device = DeviceId::from_bytes([6; 16]);
    let other_device = DeviceId::from_bytes([5; 16]);
    for device in [replaced_device, other_device] {
        target
            .put_key_packages(&device, &[], Some(&last_resort_of(device)))
            .unwrap();
    }
    let target_head = SignedTreeHead::sign(1, target.kt_root(1).unwrap(), 1, "t", &key);
    target.put_tree_head(&target_head).unwrap();

    // The import names the group whose log it extended, with its newest entry and the
    // Welcome it brought. A second import of the same snapshot brings nothing new.
    let news = target.import_shared(&shard_part(), &groups).unwrap();
    let expected = ImportedNews {
        group: group(),
        newest_seq: 2,
        welcomes: vec![(invited, welcome)],
    };
    assert_eq!(news, vec![expected]);
    let again = target.import_shared(&shard_part(), &groups).unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert!(target.load_group(&elsewhere).unwrap().is_some());
    assert_eq!(target.load_group(&replaced).unwrap(), None);
    let (meta, state) = target.load_group(&group()).unwrap().unwrap();
    assert_eq!(meta.last_seq, 2);
    assert_eq!(state, b"state");
    assert_eq!(target.read_log(&group(), 0, 10).unwrap().len(), 2);
    assert_eq!(target.cursor(&reader, &group()).unwrap(), 2);
    assert!(target.claim_key_package(&in_shard, 1).unwrap().is_some());
    assert!(
        target
            .claim_key_package(&replaced_device, 1)
            .unwrap()
            .is_none()
    );
    assert!(
        target
            .claim_key_package(&other_device, 1)
            .unwrap()
            .is_some()
    );
    // The shard snapshot left the directory alone.
    assert_eq!(target.account_devices("fred").unwrap().len(), 1);

    target
        .import_shared(&SharedPart::Directory, &directory)
        .unwrap();
    assert_eq!(target.account_devices("dana").unwrap().len(), 3);
    assert!(target.account_devices("fred").unwrap().is_empty());
    assert!(target.account("erin").unwrap().is_some());
    assert_eq!(
        target.node_keys().unwrap(),
        vec![("node-a".to_owned(), node_keys)]
    );
    assert_eq!(target.kt_size(), 3);
    assert_eq!(target.kt_root(3).unwrap(), source.kt_root(3).unwrap());
    assert_eq!(target.latest_tree_head().unwrap(), Some(target_head));
    assert_eq!(target.tree_head(3).unwrap(), None);
    assert!(target.load_group(&elsewhere).unwrap().is_some());
    assert!(target.claim_key_package(&in_shard, 1).unwrap().is_some());
}

#[tokio::test]
async fn snapshot_of_other_part_is_rejected() {
    let source_dir = tempfile::tempdir().unwrap();
    let source = Store::open(source_dir.path()).unwrap();
    source.create_group(&group(), &meta(0), b"state").unwrap();
    let shard = source.export_shared(&shard_part()).unwrap();
    let directory = source.export_shared(&SharedPart::Directory).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let result = store.import_shared(&SharedPart::Directory, &shard);
    assert!(
        matches!(&result, Err(StorageError::Corrupt { detail, .. }) if detail.contains("key_packages")),
        "{result:?}"
    );
    let result = store.import_shared(&shard_part(), &directory);
    assert!(
        matches!(&result, Err(StorageError::Corrupt { detail, .. }) if detail.contains("directory")),
        "{result:?}"
    );
    assert!(store.load_group(&group()).unwrap().is_none());
}

#[tokio::test]
async fn damaged_snapshot_changes_nothing() {
    let source_dir = tempfile::tempdir().unwrap();
    let source = Store::open(source_dir.path()).unwrap();
    source
        .create_group(&group(), &meta(0), b"new state")
        .unwrap();
    let snapshot = source.export_shared(&shard_part()).unwrap();

    let target_dir = tempfile::tempdir().unwrap();
    let target = Store::open(target_dir.path()).unwrap();
    target
        .create_group(&group(), &meta(0), b"old state")
        .unwrap();
    let mut flipped = snapshot.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 1;
    let mut foreign = snapshot.clone();
    foreign[0] = b'X';
    let cases: [(&str, &[u8], &str); 4] = [
        (
            "truncated",
            &snapshot[..snapshot.len() - 1],
            "without its end",
        ),
        (
            "cut after a record",
            &snapshot[..snapshot.len() - 41],
            "without its end",
        ),
        ("flipped", &flipped, "checksum"),
        ("foreign", &foreign, "format mark"),
    ];
    for (case, bytes, expected) in cases {
        let result = target.import_shared(&shard_part(), bytes);
        assert!(
            matches!(&result, Err(StorageError::Corrupt { detail, .. }) if detail.contains(expected)),
            "{case}: {result:?}"
        );
        let (_, state) = target.load_group(&group()).unwrap().unwrap();
        assert_eq!(state, b"old state", "{case}");
    }

    // The same snapshot through a file replaces the group.
    let mut file = tempfile::tempfile().unwrap();
    let records = source.export_shared_to(&shard_part(), &mut file).unwrap();
    assert!(records > 0);
    let mut written = Vec::new();
    std::io::Seek::rewind(&mut file).unwrap();
    std::io::Read::read_to_end(&mut file, &mut written).unwrap();
    assert_eq!(written, snapshot);
    std::io::Seek::rewind(&mut file).unwrap();
    target.check_shared(&shard_part(), &mut file).unwrap();
    target.import_shared_from(&shard_part(), &mut file).unwrap();
    let (_, state) = target.load_group(&group()).unwrap().unwrap();
    assert_eq!(state, b"new state");
}

#[tokio::test]
async fn snapshot_record_outside_its_part_is_refused() {
    let source_dir = tempfile::tempdir().unwrap();
    let source = Store::open(source_dir.path()).unwrap();
    let elsewhere = GroupId::new(b"group-b".to_vec()).unwrap();
    source.create_group(&elsewhere, &meta(0), b"other").unwrap();
    let everything = SharedPart::Shard(Arc::new(|_: &[u8]| true));
    let snapshot = source.export_shared(&everything).unwrap();

    let target_dir = tempfile::tempdir().unwrap();
    let target = Store::open(target_dir.path()).unwrap();
    target.create_group(&group(), &meta(0), b"state").unwrap();
    let result = target.import_shared(&shard_part(), &snapshot);
    assert!(
        matches!(&result, Err(StorageError::Corrupt { detail, .. }) if detail.contains("outside")),
        "{result:?}"
    );
    assert!(target.load_group(&elsewhere).unwrap().is_none());
    assert!(target.load_group(&group()).unwrap().is_some());
}

#[tokio::test]
async fn shard_log_start_is_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.shard_log_start().unwrap(), None);
    let start = ShardLogStart {
        shards: 16,
        voters: vec![(7, "node-a".to_owned()), (9, "node-b".to_owned())],
        replication: 3,
        cluster: 11,
    };
    store.apply(&Change::StartShardLogs(start.clone())).unwrap();
    let again = store.apply(&Change::StartShardLogs(ShardLogStart {
        shards: 32,
        voters: vec![(1, "node-c".to_owned())],
        replication: 2,
        cluster: 12,
    }));
    assert!(matches!(again, Err(StorageError::Conflict(_))), "{again:?}");
    assert_eq!(store.shard_log_start().unwrap(), Some(start.clone()));

    // The record travels with the directory's snapshots.
    let snapshot = store.export_shared(&SharedPart::Directory).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other = Store::open(other_dir.path()).unwrap();
    other
        .import_shared(&SharedPart::Directory, &snapshot)
        .unwrap();
    assert_eq!(other.shard_log_start().unwrap(), Some(start));
}

fn set_key(set: u64, part: u64) -> Vec<u8> {
    let mut key = b"crash-test-".to_vec();
    key.extend_from_slice(&set.to_be_bytes());
    key.extend_from_slice(&part.to_be_bytes());
    key
}

#[tokio::test]
async fn interrupted_write_set_is_completed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.groups.insert(b"old", b"gone soon").unwrap();
        let mut set = WriteSet::new(&store.groups);
        set.insert(&b"first"[..], &b"one"[..]);
        set.remove(&b"old"[..]);
        set.insert(&b"second"[..], &b"two"[..]);
        // As a crash right after the redo record was written would leave the database.
        store.atomic.record_only(&set).unwrap();
        assert_eq!(store.groups.get(b"first").unwrap(), None);
        store.close().await.unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.groups.get(b"first").unwrap().unwrap(), &b"one"[..]);
    assert_eq!(store.groups.get(b"second").unwrap().unwrap(), &b"two"[..]);
    assert_eq!(store.groups.get(b"old").unwrap(), None);
    assert!(store.db.open_tree("redo").unwrap().is_empty());
}

#[tokio::test]
async fn damaged_redo_record_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let mut set = WriteSet::new(&store.groups);
        set.insert(&b"first"[..], &b"one"[..]);
        set.insert(&b"second"[..], &b"two"[..]);
        store.atomic.record_only(&set).unwrap();
        let redo = store.db.open_tree("redo").unwrap();
        let (id, raw) = redo.iter().next().unwrap().unwrap();
        redo.insert(id, &raw[..raw.len() - 1]).unwrap();
        store.close().await.unwrap();
    }
    let err = Store::open(dir.path()).err().expect("open must fail");
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("redo record"), "{err}");
}

/// Set by [`killed_writer_leaves_whole_write_sets`] for the copy of itself that it kills.
const CRASH_WRITER_DIR: &str = "ATLAS_TEST_CRASH_WRITER_DIR";
const CRASH_WRITER_FIRST: &str = "ATLAS_TEST_CRASH_WRITER_FIRST";
/// Writes in each write set of the crash test. A set is about 2 KiB with its values, so sets
/// often straddle the end of one of sled's log buffers.
const CRASH_SET_WRITES: u64 = 8;

/// Run as a child process: writes numbered write sets until it is killed.
fn write_sets_until_killed(dir: &std::ffi::OsStr) -> ! {
    let first: u64 = std::env::var(CRASH_WRITER_FIRST).unwrap().parse().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let store = Store::open(Path::new(dir)).unwrap();
    for set in first.. {
        let mut writes = WriteSet::new(&store.groups);
        for part in 0..CRASH_SET_WRITES {
            writes.insert(set_key(set, part), vec![part as u8; 256]);
        }
        store.atomic.apply(writes).unwrap();
        if (set - first) % 1000 == 999 {
            println!("written {}", set - first + 1);
        }
    }
    unreachable!("the writer runs until it is killed")
}

#[tokio::test]
async fn killed_writer_leaves_whole_write_sets() {
    use std::io::BufRead;
    if let Some(dir) = std::env::var_os(CRASH_WRITER_DIR) {
        write_sets_until_killed(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let rounds = 4;
    for round in 0..rounds {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "tests::killed_writer_leaves_whole_write_sets",
                "--exact",
                "--nocapture",
            ])
            .env(CRASH_WRITER_DIR, dir.path())
            .env(CRASH_WRITER_FIRST, (round * 1_000_000).to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Killed once it has written several of sled's 512 KiB log buffers, without a flush.
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut written = 0;
        for line in lines {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("written ") {
                written = n.parse().unwrap();
                if written >= 3000 {
                    break;
                }
            }
        }
        assert!(written >= 3000, "the writer stopped after {written} sets");
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let mut whole = 0;
    for round in 0..rounds {
        for set in round * 1_000_000..round * 1_000_000 + 100_000 {
            let present: Vec<bool> = (0..CRASH_SET_WRITES)
                .map(|part| store.groups.contains_key(set_key(set, part)).unwrap())
                .collect();
            assert!(
                present.iter().all(|p| *p) || present.iter().all(|p| !p),
                "set {set} was kept in part: {present:?}"
            );
            whole += u64::from(present[0]);
        }
    }
    assert!(whole > 0, "no write set survived the kills");
    assert!(store.db.open_tree("redo").unwrap().is_empty());
}

#[tokio::test]
async fn published_node_keys_accumulate() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let key = |kid: &str, until_ms: Option<u64>| NodeKey {
        kid: kid.into(),
        public: [kid.len() as u8; 32],
        until_ms,
    };
    let publish = |keys: Vec<NodeKey>| {
        store
            .apply(&Change::PublishNodeKeys {
                node: "node-a".into(),
                keys,
            })
            .unwrap();
    };
    publish(vec![key("first", None)]);
    // The node comes back with an empty data directory and a new key: the first one stays.
    publish(vec![key("second", None)]);
    // A rotation retires the second key, which is published again with its end.
    publish(vec![key("second", Some(9)), key("third", None)]);
    assert_eq!(
        store.node_keys().unwrap(),
        vec![(
            "node-a".to_owned(),
            vec![
                key("first", None),
                key("second", Some(9)),
                key("third", None)
            ]
        )]
    );
}
