//! The server's MLS rules against real openmls clients.

use super::*;
use openmls::prelude::tls_codec::Serialize as _;
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;

struct Member {
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    account: String,
}

impl Member {
    fn new(account: &str) -> Self {
        Self::with_suite(account, CIPHERSUITE)
    }

    fn with_suite(account: &str, suite: Ciphersuite) -> Self {
        let signer = SignatureKeyPair::new(suite.signature_algorithm()).unwrap();
        Self {
            provider: OpenMlsRustCrypto::default(),
            signer,
            account: account.into(),
        }
    }

    fn device(&self) -> DeviceId {
        DeviceId::for_key(self.signer.public())
    }

    fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.account.as_bytes().to_vec()).into(),
            signature_key: self.signer.public().into(),
        }
    }

    fn key_package_with(&self, suite: Ciphersuite, lifetime: Lifetime) -> (Vec<u8>, KeyPackage) {
        let bundle = KeyPackage::builder()
            .key_package_lifetime(lifetime)
            .build(suite, &self.provider, &self.signer, self.credential())
            .unwrap();
        let kp = bundle.key_package().clone();
        (
            MlsMessageOut::from(kp.clone())
                .tls_serialize_detached()
                .unwrap(),
            kp,
        )
    }

    fn key_package(&self) -> (Vec<u8>, KeyPackage) {
        self.key_package_with(CIPHERSUITE, Lifetime::new(7 * 24 * 3600))
    }

    fn create_group(&self) -> MlsGroup {
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
            .build();
        MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &config,
            GroupId::from_slice(b"g1"),
            self.credential(),
        )
        .unwrap()
    }

    fn group_info(&self, group: &MlsGroup) -> Vec<u8> {
        group
            .export_group_info(self.provider.crypto(), &self.signer, true)
            .unwrap()
            .tls_serialize_detached()
            .unwrap()
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn key_package_of_the_device_is_accepted() {
    let alice = Member::new("alice");
    let (bytes, _) = alice.key_package();
    let record = validate_key_package(
        &bytes,
        alice.device(),
        alice.signer.public(),
        "alice",
        now_secs(),
    )
    .unwrap();
    assert_eq!(record.device, alice.device());
    assert!(!record.last_resort);
}

#[test]
fn key_package_of_another_device_is_rejected() {
    let alice = Member::new("alice");
    let mallory = Member::new("alice");
    let (bytes, _) = mallory.key_package();
    let err = validate_key_package(
        &bytes,
        alice.device(),
        alice.signer.public(),
        "alice",
        now_secs(),
    )
    .unwrap_err();
    assert!(matches!(err, MlsError::KeyPackage(_)), "{err}");
}

#[test]
fn key_package_naming_another_account_is_rejected() {
    let alice = Member::new("bob");
    let (bytes, _) = alice.key_package();
    let err = validate_key_package(
        &bytes,
        alice.device(),
        alice.signer.public(),
        "alice",
        now_secs(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("account"), "{err}");
}

#[test]
fn key_package_with_long_lifetime_is_rejected() {
    let alice = Member::new("alice");
    let (bytes, _) = alice.key_package_with(CIPHERSUITE, Lifetime::new(365 * 24 * 3600));
    let err = validate_key_package(
        &bytes,
        alice.device(),
        alice.signer.public(),
        "alice",
        now_secs(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("lifetime"), "{err}");
}

#[test]
fn key_package_outside_its_lifetime_is_rejected() {
    let alice = Member::new("alice");
    let (bytes, _) = alice.key_package();
    let later = now_secs() + 30 * 24 * 3600;
    let err = validate_key_package(
        &bytes,
        alice.device(),
        alice.signer.public(),
        "alice",
        later,
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not cover"), "{err}");
}

#[test]
fn key_package_with_other_ciphersuite_is_rejected() {
    let suite = Ciphersuite::MLS_128_DHKEMP256_AES128GCM_SHA256_P256;
    let alice = Member::with_suite("alice", suite);
    let (bytes, _) = alice.key_package_with(suite, Lifetime::new(3600));
    let err = validate_key_package(
        &bytes,
        alice.device(),
        alice.signer.public(),
        "alice",
        now_secs(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("ciphersuite"), "{err}");
}

#[test]
fn garbage_is_not_a_key_package() {
    let alice = Member::new("alice");
    let err = validate_key_package(&[0, 1, 2], alice.device(), alice.signer.public(), "a", 0)
        .unwrap_err();
    assert!(matches!(err, MlsError::Malformed(_)), "{err}");
}

/// Alice's group with Bob added, and the server's state after the add.
fn group_with_bob() -> (Member, MlsGroup, Member, MlsGroup, PublicState) {
    let alice = Member::new("alice");
    let bob = Member::new("bob");
    let mut alice_group = alice.create_group();
    let mut state = PublicState::from_group_info(&alice.group_info(&alice_group)).unwrap();
    assert_eq!(state.epoch(), 0);
    assert!(state.is_member(&alice.device()));

    let (_, bob_kp) = bob.key_package();
    let (commit, welcome, _) = alice_group
        .add_members(&alice.provider, &alice.signer, &[bob_kp])
        .unwrap();
    let outcome = state
        .apply_commit(&commit.tls_serialize_detached().unwrap(), &alice.device())
        .unwrap();
    assert_eq!(outcome.epoch, 1);
    assert_eq!(outcome.added, vec![bob.device()]);
    alice_group.merge_pending_commit(&alice.provider).unwrap();

    let welcome = match welcome.body() {
        MlsMessageBodyOut::Welcome(w) => w.clone(),
        _ => panic!("not a welcome"),
    };
    let join = MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .wire_format_policy(MIXED_PLAINTEXT_WIRE_FORMAT_POLICY)
        .build();
    let bob_group = StagedWelcome::new_from_welcome(&bob.provider, &join, welcome, None)
        .unwrap()
        .into_group(&bob.provider)
        .unwrap();
    (alice, alice_group, bob, bob_group, state)
}

#[test]
fn commit_updates_roster_and_epoch() {
    let (_, _, bob, _, state) = group_with_bob();
    assert!(state.is_member(&bob.device()));
    assert_eq!(state.member_devices().count(), 2);
}

#[test]
fn state_survives_serialization() {
    let (alice, _, bob, _, state) = group_with_bob();
    let restored = PublicState::from_bytes(state.group_id(), &state.to_bytes()).unwrap();
    assert_eq!(restored.epoch(), 1);
    assert!(restored.is_member(&alice.device()));
    assert!(restored.is_member(&bob.device()));
}

#[test]
fn application_message_from_member_is_accepted() {
    let (_, _, bob, mut bob_group, state) = group_with_bob();
    let message = bob_group
        .create_message(&bob.provider, &bob.signer, b"hi")
        .unwrap();
    let bytes = message.tls_serialize_detached().unwrap();
    assert_eq!(state.check_application(&bytes, &bob.device()).unwrap(), 1);
    // The same bytes sent over a non-member's connection are rejected.
    let carol = Member::new("carol");
    let err = state
        .check_application(&bytes, &carol.device())
        .unwrap_err();
    assert_eq!(err, MlsError::NotMember(carol.device()));
}

#[test]
fn second_commit_for_an_epoch_is_rejected() {
    let (alice, mut alice_group, bob, mut bob_group, mut state) = group_with_bob();
    let carol = Member::new("carol");
    let dave = Member::new("dave");
    let (commit_a, _, _) = alice_group
        .add_members(&alice.provider, &alice.signer, &[carol.key_package().1])
        .unwrap();
    let (commit_b, _, _) = bob_group
        .add_members(&bob.provider, &bob.signer, &[dave.key_package().1])
        .unwrap();
    state
        .apply_commit(&commit_a.tls_serialize_detached().unwrap(), &alice.device())
        .unwrap();
    let err = state
        .apply_commit(&commit_b.tls_serialize_detached().unwrap(), &bob.device())
        .unwrap_err();
    assert_eq!(
        err,
        MlsError::WrongEpoch {
            sent: 1,
            current: 2
        }
    );
}

#[test]
fn commit_from_another_device_than_its_signer_is_rejected() {
    let (alice, mut alice_group, bob, _, mut state) = group_with_bob();
    let carol = Member::new("carol");
    let (commit, _, _) = alice_group
        .add_members(&alice.provider, &alice.signer, &[carol.key_package().1])
        .unwrap();
    let before = state.epoch();
    let err = state
        .apply_commit(&commit.tls_serialize_detached().unwrap(), &bob.device())
        .unwrap_err();
    assert!(matches!(err, MlsError::Rejected(_)), "{err}");
    assert_eq!(state.epoch(), before);
}

#[test]
fn wire_formats_are_not_interchangeable() {
    let (alice, mut alice_group, bob, mut bob_group, mut state) = group_with_bob();
    let application = bob_group
        .create_message(&bob.provider, &bob.signer, b"hi")
        .unwrap();
    let err = state
        .apply_commit(
            &application.tls_serialize_detached().unwrap(),
            &bob.device(),
        )
        .unwrap_err();
    assert!(matches!(err, MlsError::Unexpected(_)), "{err}");

    let carol = Member::new("carol");
    let (commit, _, _) = alice_group
        .add_members(&alice.provider, &alice.signer, &[carol.key_package().1])
        .unwrap();
    let err = state
        .check_application(&commit.tls_serialize_detached().unwrap(), &alice.device())
        .unwrap_err();
    assert!(matches!(err, MlsError::Unexpected(_)), "{err}");
    assert_eq!(state.epoch(), 1);
}
