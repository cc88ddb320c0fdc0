//! Proof checks against a second verifier written here from the RFC 9162 definitions
//! (sections 2.1.1 to 2.1.4), independent of tlog_tiles.

use super::*;
use sha2::{Digest, Sha256};
use tlog_tiles::tlog::{HashReader, stored_hashes};

/// Stored hashes of an in-memory log, indexed as tlog_tiles stores them.
#[derive(Default)]
struct MemoryLog {
    hashes: Vec<Hash>,
    leaves: Vec<Vec<u8>>,
}

impl HashReader for MemoryLog {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog::Error> {
        indexes
            .iter()
            .map(|&i| {
                self.hashes
                    .get(i as usize)
                    .copied()
                    .ok_or(tlog::Error::IndexesNotInTree)
            })
            .collect()
    }
}

impl MemoryLog {
    fn append(&mut self, leaf: Vec<u8>) {
        let n = self.leaves.len() as u64;
        let new = stored_hashes(n, &leaf, self).unwrap();
        self.hashes.extend(new);
        self.leaves.push(leaf);
    }

    fn root(&self, size: u64) -> [u8; 32] {
        tlog::tree_hash(size, self).unwrap().0
    }

    fn inclusion(&self, index: u64, size: u64) -> Vec<[u8; 32]> {
        tlog::prove_record(size, index, self)
            .unwrap()
            .into_iter()
            .map(|h| h.0)
            .collect()
    }

    fn consistency(&self, from: u64, to: u64) -> Vec<[u8; 32]> {
        tlog::prove_tree(to, from, self)
            .unwrap()
            .into_iter()
            .map(|h| h.0)
            .collect()
    }
}

fn leaf_hash(leaf: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update([0u8])
        .chain_update(leaf)
        .finalize()
        .into()
}

fn node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update([1u8])
        .chain_update(left)
        .chain_update(right)
        .finalize()
        .into()
}

/// Largest power of two smaller than `n` (n > 1).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// MTH(D[n]) by the recursive definition.
fn mth(leaves: &[Vec<u8>]) -> [u8; 32] {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaf_hash(&leaves[0]),
        n => {
            let k = split(n);
            node(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// PATH(m, D[n]) by the recursive definition.
fn path(m: usize, leaves: &[Vec<u8>]) -> Vec<[u8; 32]> {
    let n = leaves.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = split(n);
    if m < k {
        let mut out = path(m, &leaves[..k]);
        out.push(mth(&leaves[k..]));
        out
    } else {
        let mut out = path(m - k, &leaves[k..]);
        out.push(mth(&leaves[..k]));
        out
    }
}

/// SUBPROOF(m, D[n], b) by the recursive definition.
fn subproof(m: usize, leaves: &[Vec<u8>], complete: bool) -> Vec<[u8; 32]> {
    let n = leaves.len();
    if m == n {
        return if complete {
            Vec::new()
        } else {
            vec![mth(leaves)]
        };
    }
    let k = split(n);
    if m <= k {
        let mut out = subproof(m, &leaves[..k], complete);
        out.push(mth(&leaves[k..]));
        out
    } else {
        let mut out = subproof(m - k, &leaves[k..], false);
        out.push(mth(&leaves[..k]));
        out
    }
}

/// Inclusion verification as RFC 9162 section 2.1.3.2 describes it.
fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &[u8],
    path: &[[u8; 32]],
    root: &[u8; 32],
) -> bool {
    if index >= size {
        return false;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = leaf_hash(leaf);
    for p in path {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && &r == root
}

/// Consistency verification as RFC 9162 section 2.1.4.2 describes it.
fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &[u8; 32],
    second_root: &[u8; 32],
    proof: &[[u8; 32]],
) -> bool {
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if first == 0 || first > second || proof.is_empty() {
        return false;
    }
    let mut proof = proof.to_vec();
    if first.is_power_of_two() {
        proof.insert(0, *first_root);
    }
    let (mut f_n, mut s_n) = (first - 1, second - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let (mut fr, mut sr) = (proof[0], proof[0]);
    for c in &proof[1..] {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            fr = node(c, &fr);
            sr = node(c, &sr);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            sr = node(&sr, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    &fr == first_root && &sr == second_root && s_n == 0
}

fn sample_log(n: usize) -> MemoryLog {
    let mut log = MemoryLog::default();
    for i in 0..n {
        log.append(format!("leaf {i}").into_bytes());
    }
    log
}

fn signer() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

fn jwks_for(kid: &str, key: &SigningKey) -> Jwks {
    Jwks {
        keys: vec![Jwk::ed25519(kid, &key.verifying_key())],
    }
}

fn head(log: &MemoryLog, size: u64) -> SignedTreeHead {
    SignedTreeHead::sign(size, log.root(size), 1_000, "k1", &signer())
}

fn event(i: u64) -> KeyEvent {
    KeyEvent {
        kind: KeyEventKind::Added,
        account: format!("user{i}"),
        device: DeviceId::for_key(&[i as u8; 32]),
        key: vec![i as u8; 32],
        time_ms: i,
        authorization: Authorization::DeviceSignature {
            signer: DeviceId::for_key(&[0; 32]),
            signature: vec![0; 64],
        },
    }
}

#[test]
fn roots_match_recursive_definition() {
    let log = sample_log(70);
    for size in 0..=70 {
        assert_eq!(
            log.root(size as u64),
            mth(&log.leaves[..size]),
            "size {size}"
        );
    }
}

#[test]
fn certificate_transparency_sample_root() {
    // The eight leaves of the RFC 6962 reference implementation's Merkle tree tests.
    let leaves: Vec<Vec<u8>> = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
    .iter()
    .map(|h| {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    })
    .collect();
    let mut log = MemoryLog::default();
    for leaf in &leaves {
        log.append(leaf.clone());
    }
    let hex: String = log.root(8).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
    );
}

#[test]
fn inclusion_proofs_match_rfc_and_verify() {
    let log = sample_log(33);
    for size in 1..=33u64 {
        let h = head(&log, size);
        for index in 0..size {
            let proof = log.inclusion(index, size);
            let leaves = &log.leaves[..size as usize];
            assert_eq!(
                proof,
                path(index as usize, leaves),
                "index {index} size {size}"
            );
            assert!(verify_inclusion(
                index,
                size,
                &leaves[index as usize],
                &proof,
                &h.root
            ));
            let entry = ProvenEntry {
                index,
                leaf: leaves[index as usize].clone(),
                tree_size: size,
                path: wire_path(proof.iter().map(|h| Hash(*h))),
            };
            // The leaves are not key events, so a passing check ends in the decode error.
            assert!(matches!(
                entry.verify(&h),
                Err(ProofError::MalformedEntry(_))
            ));
        }
    }
}

#[test]
fn consistency_proofs_match_rfc_and_verify() {
    let log = sample_log(33);
    for to in 1..=33u64 {
        for from in 1..=to {
            let proof = log.consistency(from, to);
            let leaves = &log.leaves[..to as usize];
            let expected = if from == to {
                Vec::new()
            } else {
                subproof(from as usize, leaves, true)
            };
            assert_eq!(proof, expected, "from {from} to {to}");
            let (old, new) = (head(&log, from), head(&log, to));
            assert!(verify_consistency(from, to, &old.root, &new.root, &proof));
            let wire = ConsistencyProof {
                from,
                to,
                path: wire_path(proof.iter().map(|h| Hash(*h))),
            };
            assert_eq!(wire.verify(&old, &new), Ok(()), "from {from} to {to}");
        }
    }
}

#[test]
fn key_event_entry_verifies() {
    let mut log = MemoryLog::default();
    for i in 0..5 {
        log.append(event(i).to_leaf());
    }
    let h = head(&log, 5);
    let entry = ProvenEntry {
        index: 3,
        leaf: log.leaves[3].clone(),
        tree_size: 5,
        path: wire_path(log.inclusion(3, 5).into_iter().map(Hash)),
    };
    assert_eq!(entry.verify(&h), Ok(event(3)));
}

#[test]
fn tampered_inclusion_is_rejected() {
    let mut log = MemoryLog::default();
    for i in 0..9 {
        log.append(event(i).to_leaf());
    }
    let h = head(&log, 9);
    let good = ProvenEntry {
        index: 4,
        leaf: log.leaves[4].clone(),
        tree_size: 9,
        path: wire_path(log.inclusion(4, 9).into_iter().map(Hash)),
    };
    assert!(good.verify(&h).is_ok());

    let mut wrong_leaf = good.clone();
    wrong_leaf.leaf = log.leaves[5].clone();
    assert_eq!(
        wrong_leaf.verify(&h),
        Err(ProofError::InclusionFailed { index: 4, size: 9 })
    );

    let mut flipped = good.clone();
    let mut first = flipped.path[0].into_array();
    first[0] ^= 1;
    flipped.path[0] = serde_bytes::ByteArray::new(first);
    assert!(matches!(
        flipped.verify(&h),
        Err(ProofError::InclusionFailed { .. })
    ));

    let mut truncated = good.clone();
    truncated.path.pop();
    assert!(matches!(
        truncated.verify(&h),
        Err(ProofError::InclusionFailed { .. })
    ));

    let mut moved = good.clone();
    moved.index = 5;
    assert!(matches!(
        moved.verify(&h),
        Err(ProofError::InclusionFailed { .. })
    ));

    let mut outside = good.clone();
    outside.index = 9;
    assert_eq!(
        outside.verify(&h),
        Err(ProofError::IndexOutOfRange { index: 9, size: 9 })
    );

    let mut other_size = good;
    other_size.tree_size = 8;
    assert_eq!(
        other_size.verify(&h),
        Err(ProofError::SizeMismatch { proof: 8, head: 9 })
    );
}

#[test]
fn tampered_consistency_is_rejected() {
    let log = sample_log(20);
    let (old, new) = (head(&log, 7), head(&log, 20));
    let good = ConsistencyProof {
        from: 7,
        to: 20,
        path: wire_path(log.consistency(7, 20).into_iter().map(Hash)),
    };
    assert_eq!(good.verify(&old, &new), Ok(()));

    let mut flipped = good.clone();
    let last = flipped.path.len() - 1;
    let mut hash = flipped.path[last].into_array();
    hash[31] ^= 0x80;
    flipped.path[last] = serde_bytes::ByteArray::new(hash);
    assert!(flipped.verify(&old, &new).is_err());

    let mut truncated = good.clone();
    truncated.path.pop();
    assert!(truncated.verify(&old, &new).is_err());

    // A forked log: same first 6 entries, a different 7th.
    let mut fork = sample_log(6);
    fork.append(b"forged".to_vec());
    let forked_old = head(&fork, 7);
    assert_eq!(
        good.verify(&forked_old, &new),
        Err(ProofError::ConsistencyFailed { from: 7, to: 20 })
    );
}

#[test]
fn tree_head_signature_checks() {
    let log = sample_log(4);
    let h = head(&log, 4);
    let jwks = jwks_for("k1", &signer());
    assert_eq!(h.verify(&jwks, 2_000), Ok(()));

    let mut wrong_root = h.clone();
    wrong_root.root[0] ^= 1;
    assert_eq!(
        wrong_root.verify(&jwks, 2_000),
        Err(ProofError::BadSignature(4))
    );

    let mut wrong_size = h.clone();
    wrong_size.size = 5;
    assert_eq!(
        wrong_size.verify(&jwks, 2_000),
        Err(ProofError::BadSignature(5))
    );

    let other = jwks_for("k1", &SigningKey::from_bytes(&[9u8; 32]));
    assert_eq!(h.verify(&other, 2_000), Err(ProofError::BadSignature(4)));

    let unknown = jwks_for("k2", &signer());
    assert_eq!(
        h.verify(&unknown, 2_000),
        Err(ProofError::UnknownKey("k1".into()))
    );

    let future = SignedTreeHead::sign(
        4,
        h.root,
        1_000 + MAX_HEAD_CLOCK_SKEW_MS + 1,
        "k1",
        &signer(),
    );
    assert!(matches!(
        future.verify(&jwks, 1_000),
        Err(ProofError::FutureHead { .. })
    ));
}

#[test]
fn jwk_rejects_other_key_types() {
    let mut jwk = Jwk::ed25519("k", &signer().verifying_key());
    assert_eq!(jwk.verifying_key(), Ok(signer().verifying_key()));
    jwk.crv = "X25519".into();
    assert!(matches!(
        jwk.verifying_key(),
        Err(ProofError::InvalidJwk { .. })
    ));
    let mut short = Jwk::ed25519("k", &signer().verifying_key());
    short.x.truncate(20);
    assert!(matches!(
        short.verifying_key(),
        Err(ProofError::InvalidJwk { .. })
    ));
}

#[test]
fn statement_separates_fields() {
    let device = DeviceId::for_key(&[1; 32]);
    let a = key_event_statement(KeyEventKind::Revoked, "node", "ab", &device, &[1; 32], 5);
    let b = key_event_statement(KeyEventKind::Revoked, "node", "a", &device, &[1; 32], 5);
    let c = key_event_statement(KeyEventKind::Rotated, "node", "ab", &device, &[1; 32], 5);
    assert_ne!(a, b);
    assert_ne!(a, c);
}

/// A device key with helpers to build its key events.
struct TestDevice {
    key: SigningKey,
}

impl TestDevice {
    fn new(seed: u8) -> Self {
        Self {
            key: SigningKey::from_bytes(&[seed; 32]),
        }
    }

    fn public(&self) -> Vec<u8> {
        self.key.verifying_key().to_bytes().to_vec()
    }

    fn id(&self) -> DeviceId {
        DeviceId::for_key(&self.public())
    }

    fn added(&self, account: &str, server: &str) -> KeyEvent {
        let nonce = vec![9u8; 32];
        let transcript = crate::login_transcript(server, &nonce, account);
        KeyEvent {
            kind: KeyEventKind::Added,
            account: account.into(),
            device: self.id(),
            key: self.public(),
            time_ms: 1,
            authorization: Authorization::LoginSignature {
                server_name: server.into(),
                nonce,
                signature: self.key.sign(&transcript).to_bytes().to_vec(),
            },
        }
    }

    fn enrolls(&self, new: &Self, account: &str) -> KeyEvent {
        let statement = key_event_statement(
            KeyEventKind::Added,
            "node",
            account,
            &new.id(),
            &new.public(),
            3,
        );
        KeyEvent {
            kind: KeyEventKind::Added,
            account: account.into(),
            device: new.id(),
            key: new.public(),
            time_ms: 3,
            authorization: Authorization::Enrollment {
                signer: self.id(),
                signature: self.key.sign(&statement).to_bytes().to_vec(),
                new_key_signature: new.key.sign(&statement).to_bytes().to_vec(),
            },
        }
    }

    fn revokes(&self, target: &Self, account: &str) -> KeyEvent {
        let statement = key_event_statement(
            KeyEventKind::Revoked,
            "node",
            account,
            &target.id(),
            &target.public(),
            5,
        );
        KeyEvent {
            kind: KeyEventKind::Revoked,
            account: account.into(),
            device: target.id(),
            key: target.public(),
            time_ms: 5,
            authorization: Authorization::DeviceSignature {
                signer: self.id(),
                signature: self.key.sign(&statement).to_bytes().to_vec(),
            },
        }
    }

    fn rotates_to(&self, new: &Self, account: &str) -> KeyEvent {
        let statement = key_event_statement(
            KeyEventKind::Rotated,
            "node",
            account,
            &new.id(),
            &new.public(),
            7,
        );
        KeyEvent {
            kind: KeyEventKind::Rotated,
            account: account.into(),
            device: new.id(),
            key: new.public(),
            time_ms: 7,
            authorization: Authorization::Rotation {
                previous: self.id(),
                previous_signature: self.key.sign(&statement).to_bytes().to_vec(),
                new_key_signature: new.key.sign(&statement).to_bytes().to_vec(),
            },
        }
    }
}

#[test]
fn replay_accepts_valid_history() {
    let (a, b, c) = (TestDevice::new(1), TestDevice::new(2), TestDevice::new(3));
    let mut replay = DirectoryReplay::default();
    replay.apply(0, &a.added("alice", "node"), "node").unwrap();
    replay.apply(1, &a.enrolls(&b, "alice"), "node").unwrap();
    replay.apply(2, &a.revokes(&b, "alice"), "node").unwrap();
    replay.apply(3, &a.rotates_to(&c, "alice"), "node").unwrap();
    assert_eq!(replay.devices("alice"), vec![(c.id(), c.public())]);
}

#[test]
fn replay_rejects_bad_authorisations() {
    let (a, b, mallory) = (TestDevice::new(1), TestDevice::new(2), TestDevice::new(6));
    let base = || {
        let mut replay = DirectoryReplay::default();
        replay.apply(0, &a.added("alice", "node"), "node").unwrap();
        replay.apply(1, &a.enrolls(&b, "alice"), "node").unwrap();
        replay
    };

    // A login registration into an account that exists is a takeover.
    let err = base()
        .apply(2, &mallory.added("alice", "node"), "node")
        .unwrap_err();
    assert!(err.reason.contains("already existed"), "{err}");

    // An enrollment signed by a device of another account, or without the new key's signature.
    let mut replay = base();
    replay
        .apply(2, &mallory.added("mallory", "node"), "node")
        .unwrap();
    let mut foreign = mallory.enrolls(&TestDevice::new(8), "alice");
    assert!(replay.apply(3, &foreign, "node").is_err());
    foreign = a.enrolls(&TestDevice::new(8), "alice");
    if let Authorization::Enrollment {
        new_key_signature, ..
    } = &mut foreign.authorization
    {
        new_key_signature[5] ^= 1;
    }
    assert!(base().apply(2, &foreign, "node").is_err());

    // A login signed for another server, or by another key than the one added.
    let fresh = DirectoryReplay::default;
    assert!(
        fresh()
            .apply(0, &mallory.added("zed", "other"), "node")
            .is_err()
    );
    let mut forged = mallory.added("zed", "node");
    forged.key = TestDevice::new(7).public();
    forged.device = TestDevice::new(7).id();
    assert!(fresh().apply(0, &forged, "node").is_err());

    // A device id that is not derived from the key.
    let mut wrong_id = mallory.added("zed", "node");
    wrong_id.device = a.id();
    assert!(fresh().apply(0, &wrong_id, "node").is_err());

    // A revocation signed by a device of another account.
    let mut replay = base();
    replay
        .apply(2, &mallory.added("mallory", "node"), "node")
        .unwrap();
    let err = replay
        .apply(3, &mallory.revokes(&b, "alice"), "node")
        .unwrap_err();
    assert!(err.reason.contains("not a current device"), "{err}");

    // A revoked device signs nothing more and never comes back.
    let mut replay = base();
    replay.apply(2, &a.revokes(&b, "alice"), "node").unwrap();
    assert!(replay.apply(3, &b.revokes(&a, "alice"), "node").is_err());
    assert!(replay.apply(3, &a.enrolls(&b, "alice"), "node").is_err());

    // A rotation without the new key's signature.
    let mut rotation = a.rotates_to(&mallory, "alice");
    if let Authorization::Rotation {
        new_key_signature, ..
    } = &mut rotation.authorization
    {
        new_key_signature[0] ^= 1;
    }
    let err = base().apply(2, &rotation, "node").unwrap_err();
    assert!(err.reason.contains("new key"), "{err}");

    // A registration authorised like a revocation.
    let mut mislabelled = a.revokes(&b, "alice");
    mislabelled.kind = KeyEventKind::Added;
    assert!(base().apply(2, &mislabelled, "node").is_err());

    // The same key twice.
    assert!(base().apply(2, &a.added("alice", "node"), "node").is_err());

    // Statements name the server: an enrollment signed for "node" does not verify elsewhere.
    let mut elsewhere = DirectoryReplay::default();
    elsewhere
        .apply(0, &a.added("alice", "other"), "other")
        .unwrap();
    let err = elsewhere
        .apply(1, &a.enrolls(&b, "alice"), "other")
        .unwrap_err();
    assert!(err.reason.contains("does not verify"), "{err}");
}

/// Builds an `added` event for `device` authorised by a passkey token, signed by `node`.
fn granted(device: &TestDevice, account: &str, node: &SigningKey, kid: &str) -> KeyEvent {
    let statement = key_event_statement(
        KeyEventKind::Added,
        "node",
        account,
        &device.id(),
        &device.public(),
        4,
    );
    KeyEvent {
        kind: KeyEventKind::Added,
        account: account.into(),
        device: device.id(),
        key: device.public(),
        time_ms: 4,
        authorization: Authorization::PasskeyToken {
            token_id: "jti-1".into(),
            kid: kid.into(),
            node_signature: node
                .sign(&passkey_grant_statement(&statement, "jti-1"))
                .to_bytes()
                .to_vec(),
            new_key_signature: device.key.sign(&statement).to_bytes().to_vec(),
        },
    }
}

#[test]
fn replay_checks_passkey_grants() {
    let node = signer();
    let jwks = jwks_for("node-key", &node);
    let (a, b) = (TestDevice::new(1), TestDevice::new(2));

    let mut replay = DirectoryReplay::default();
    replay.learn_keys(&jwks);
    replay
        .apply(0, &granted(&a, "alice", &node, "node-key"), "node")
        .unwrap();
    // A second device by token joins the same account.
    replay
        .apply(1, &granted(&b, "alice", &node, "node-key"), "node")
        .unwrap();
    assert_eq!(replay.devices("alice").len(), 2);
    assert_eq!(replay.unverified_grants(), 0);

    // A grant signed by another key than the named one fails.
    let mut replay = DirectoryReplay::default();
    replay.learn_keys(&jwks);
    let forged = granted(&a, "alice", &SigningKey::from_bytes(&[42; 32]), "node-key");
    let err = replay.apply(0, &forged, "node").unwrap_err();
    assert!(err.reason.contains("grant"), "{err}");

    // The new key's signature is checked even when the node key is unknown.
    let mut replay = DirectoryReplay::default();
    let mut event = granted(&a, "alice", &node, "node-key");
    if let Authorization::PasskeyToken {
        new_key_signature, ..
    } = &mut event.authorization
    {
        new_key_signature[0] ^= 1;
    }
    assert!(replay.apply(0, &event, "node").is_err());
    replay
        .apply(0, &granted(&a, "alice", &node, "node-key"), "node")
        .unwrap();
    assert_eq!(replay.unverified_grants(), 1);
}
