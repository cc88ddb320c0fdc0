use super::*;
use atlas_protocol::EntryKind;

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
    let seqs: Vec<u64> = store
        .read_log(&group(), 2, 10)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, vec![3, 4, 5]);
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

#[tokio::test]
async fn device_key_cannot_move_to_another_account() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let record = DeviceRecord {
        device: DeviceId::from_bytes([3; 16]),
        account: "alice".into(),
        public_key: vec![0; 32],
        registered_at_ms: 1,
    };
    assert_eq!(store.register_device(&record).unwrap(), Registration::New);
    assert!(matches!(
        store.register_device(&record).unwrap(),
        Registration::Existing(_)
    ));
    let stolen = DeviceRecord {
        account: "mallory".into(),
        ..record
    };
    assert!(matches!(
        store.register_device(&stolen),
        Err(StorageError::DeviceOwnedElsewhere { .. })
    ));
    assert_eq!(store.account_devices("alice").unwrap().len(), 1);
    assert!(store.account_devices("mallory").unwrap().is_empty());
}

#[tokio::test]
async fn last_seq_comes_from_the_log_when_meta_was_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.create_group(&group(), &meta(0), b"s").unwrap();
    for seq in 1..=3 {
        store
            .append(&group(), &entry(seq, seq as u8), None, None, &[])
            .unwrap();
    }
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
