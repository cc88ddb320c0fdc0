//! Devices, accounts and KeyPackages: login verification and KeyPackage handling.

use crate::group::now_ms;
use crate::keyring::Keyring;
use crate::mls::{MlsError, validate_key_package};
use atlas_protocol::transparency::{
    Authorization, KeyEvent, KeyEventKind, key_event_statement, passkey_grant_statement,
};
use atlas_protocol::{DeviceId, ErrorCode, login_transcript};
use atlas_storage::{
    Change, DeviceRecord, DirectoryChange, KeyEventOutcome, KeyPackageRecord, StorageError, Store,
};
use ed25519_dalek::{Signature, VerifyingKey};

/// How far a revocation or rotation statement's time may be from the server's clock, in ms.
pub const MAX_STATEMENT_SKEW_MS: u64 = 10 * 60 * 1000;

/// Maximum length of an account name in bytes.
pub const MAX_ACCOUNT_LEN: usize = 64;

/// Failure of a login or a directory request.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The account name is empty, too long or has characters outside `[a-z0-9._-]`.
    #[error("invalid account name {0:?}: use 1 to 64 characters from a-z, 0-9, '.', '_', '-'")]
    InvalidAccount(String),
    /// The device key is not a valid Ed25519 public key.
    #[error("device key is not an Ed25519 public key")]
    BadKey,
    /// The signature does not verify over the login transcript.
    #[error("login signature does not verify for device {0}")]
    BadSignature(DeviceId),
    /// The device key belongs to another account.
    #[error("device {device} is registered under another account")]
    WrongAccount { device: DeviceId },
    /// A KeyPackage failed validation.
    #[error(transparent)]
    KeyPackage(#[from] MlsError),
    /// The device is not registered.
    #[error("device {0} not found")]
    DeviceNotFound(DeviceId),
    /// No KeyPackage is left for the device.
    #[error("no key package available for device {0}")]
    NoKeyPackage(DeviceId),
    /// The device was revoked or replaced by a key rotation.
    #[error(
        "device {0} is revoked or was replaced by a key rotation, so its key cannot be used \
         again; use a current device key, or a new one"
    )]
    Revoked(DeviceId),
    /// A revocation or rotation names a device of another account.
    #[error("device {0} does not belong to this account")]
    OtherAccount(DeviceId),
    /// A signed statement's time is too far from the server's clock.
    #[error(
        "statement time {time_ms} ms is more than 10 minutes from the server time {now_ms} ms; check the device clock"
    )]
    StaleStatement { time_ms: u64, now_ms: u64 },
    /// The new key of a rotation or enrollment is already registered.
    #[error("key of device {0} is already registered")]
    KeyInUse(DeviceId),
    /// A new key tried to register an account that already exists.
    #[error(
        "account {0:?} already exists; add this device from one of the account's devices \
         (enroll_device)"
    )]
    AccountTaken(String),
    /// An enrollment would exceed the account's device limit.
    #[error("account {account:?} already has {max} active devices; revoke one first")]
    TooManyDevices { account: String, max: usize },
    /// A signature over a revocation, rotation or enrollment statement does not verify.
    #[error("statement signature of {0} does not verify")]
    BadStatementSignature(DeviceId),
    /// Open registration is off and the device key is not enrolled in any account.
    #[error(
        "device {0} is not enrolled; enroll it with an access token from a passkey login \
         (POST /v1/devices) or from a current device of the account"
    )]
    NotEnrolled(DeviceId),
    /// A token-based enrollment names an account without passkeys.
    #[error("account {0:?} does not exist")]
    UnknownAccount(String),
    /// Storage failed.
    #[error(transparent)]
    Storage(StorageError),
}

impl From<StorageError> for LoginError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::DeviceOwnedElsewhere { device, .. } => Self::WrongAccount { device },
            StorageError::DeviceRevoked(device) => Self::Revoked(device),
            StorageError::UnknownDevice(device) => Self::DeviceNotFound(device),
            StorageError::AccountTaken(account) => Self::AccountTaken(account),
            StorageError::TooManyDevices { account, max } => Self::TooManyDevices { account, max },
            StorageError::UnknownAccount(account) => Self::UnknownAccount(account),
            other => Self::Storage(other),
        }
    }
}

impl LoginError {
    /// Returns the error code sent to the client.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidAccount(_)
            | Self::WrongAccount { .. }
            | Self::OtherAccount(_)
            | Self::AccountTaken(_)
            | Self::UnknownAccount(_) => ErrorCode::InvalidAccount,
            Self::NotEnrolled(_) => ErrorCode::DeviceNotEnrolled,
            Self::BadKey | Self::BadSignature(_) | Self::BadStatementSignature(_) => {
                ErrorCode::BadSignature
            }
            Self::TooManyDevices { .. } => ErrorCode::InvalidRequest,
            Self::Revoked(_) => ErrorCode::DeviceRevoked,
            Self::StaleStatement { .. } | Self::KeyInUse(_) => ErrorCode::InvalidRequest,
            Self::KeyPackage(_) => ErrorCode::InvalidKeyPackage,
            Self::DeviceNotFound(_) => ErrorCode::DeviceNotFound,
            Self::NoKeyPackage(_) => ErrorCode::NoKeyPackage,
            Self::Storage(StorageError::Unavailable(_)) => ErrorCode::Unavailable,
            Self::Storage(_) => ErrorCode::StorageFailure,
        }
    }
}

/// Device and KeyPackage directory over the store.
#[derive(Clone)]
pub struct Directory {
    store: Store,
    /// Name clients connect to; part of every signed login and key event statement.
    server_name: String,
}

impl Directory {
    pub fn new(store: Store, server_name: &str) -> Self {
        Self {
            store,
            server_name: server_name.to_owned(),
        }
    }

    /// Verifies a login signature over the transcript of `server_name`, `nonce` and `account`,
    /// then registers the key under `account` if it is new, appending it to the key
    /// transparency log with the login signature as its authorisation. Returns the device
    /// record and whether this login registered it. Revoked devices are refused.
    ///
    /// With `open_registration` false, a key that is not enrolled is refused instead.
    ///
    /// NOTE: open registration lets any new key claim any unused account name. It is meant for
    /// development and benchmarks, and is off by default in the node's configuration.
    pub async fn login(
        &self,
        account: &str,
        device_key: &[u8],
        signature: &[u8],
        nonce: &[u8],
        open_registration: bool,
    ) -> Result<(DeviceRecord, bool), LoginError> {
        let server_name = self.server_name.as_str();
        if !valid_account(account) {
            return Err(LoginError::InvalidAccount(
                account.chars().take(80).collect(),
            ));
        }
        let key = parse_key(device_key)?;
        let device = DeviceId::for_key(device_key);
        verify(
            &key,
            &login_transcript(server_name, nonce, account),
            signature,
        )
        .map_err(|()| LoginError::BadSignature(device))?;
        if let Some(existing) = self.store.device(&device)? {
            return match existing.revoked_at_ms {
                Some(_) => Err(LoginError::Revoked(device)),
                None if existing.account != account => Err(LoginError::WrongAccount { device }),
                None => Ok((existing, false)),
            };
        }
        if !open_registration {
            return Err(LoginError::NotEnrolled(device));
        }
        let now = now_ms();
        let record = DeviceRecord {
            device,
            account: account.to_owned(),
            public_key: device_key.to_vec(),
            registered_at_ms: now,
            kt_index: None,
            revoked_at_ms: None,
        };
        let event = KeyEvent {
            kind: KeyEventKind::Added,
            account: account.to_owned(),
            device,
            key: device_key.to_vec(),
            time_ms: now,
            authorization: Authorization::LoginSignature {
                server_name: server_name.to_owned(),
                nonce: nonce.to_vec(),
                signature: signature.to_vec(),
            },
        };
        match self
            .store
            .write_key_event(&event, &DirectoryChange::Register(record))
            .await?
        {
            KeyEventOutcome::Appended { device, .. } => Ok((device, true)),
            KeyEventOutcome::AlreadyRegistered(existing) => Ok((existing, false)),
        }
    }

    /// Revokes `target`, a device of the same account as `signer`, which signed
    /// [`key_event_statement`] for the revocation at `time_ms`. A device may revoke itself.
    /// Its KeyPackages are deleted. Returns the log index of the revocation.
    pub async fn revoke(
        &self,
        signer: &DeviceRecord,
        target: &DeviceId,
        time_ms: u64,
        signature: &[u8],
    ) -> Result<u64, LoginError> {
        let now = check_time(time_ms)?;
        let record = self
            .store
            .device(target)?
            .ok_or(LoginError::DeviceNotFound(*target))?;
        if record.account != signer.account {
            return Err(LoginError::OtherAccount(*target));
        }
        if record.revoked_at_ms.is_some() {
            return Err(LoginError::Revoked(*target));
        }
        let statement = key_event_statement(
            KeyEventKind::Revoked,
            &self.server_name,
            &record.account,
            target,
            &record.public_key,
            time_ms,
        );
        verify(&parse_key(&signer.public_key)?, &statement, signature)
            .map_err(|()| LoginError::BadStatementSignature(signer.device))?;
        let event = KeyEvent {
            kind: KeyEventKind::Revoked,
            account: record.account.clone(),
            device: *target,
            key: record.public_key.clone(),
            // The signed statement covers the client's time, so the entry keeps that time.
            time_ms,
            authorization: Authorization::DeviceSignature {
                signer: signer.device,
                signature: signature.to_vec(),
            },
        };
        // Storage checks again, under its append lock, that the signer is still active: its
        // record in the session was read at login.
        let change = DirectoryChange::Revoke {
            device: *target,
            signer: signer.device,
            at_ms: now,
        };
        let KeyEventOutcome::Appended { index, .. } =
            self.store.write_key_event(&event, &change).await?
        else {
            return Err(LoginError::Storage(StorageError::Corrupt {
                what: format!("revocation of {target}"),
                detail: "storage reported a registration".into(),
            }));
        };
        self.store
            .write_done(Change::RemoveKeyPackages { device: *target })
            .await?;
        tracing::info!(device = %target, by = %signer.device, index, "device revoked");
        Ok(index)
    }

    /// Adds a device holding `new_key` to the account of `signer`, an active device. Both keys
    /// sign [`key_event_statement`] for the addition at `time_ms`. Returns the new record and
    /// its log index.
    pub async fn enroll(
        &self,
        signer: &DeviceRecord,
        new_key: &[u8],
        time_ms: u64,
        signature: &[u8],
        new_key_signature: &[u8],
    ) -> Result<(DeviceRecord, u64), LoginError> {
        let record = self.signed_new_device(
            KeyEventKind::Added,
            signer,
            new_key,
            time_ms,
            signature,
            new_key_signature,
        )?;
        let device = record.device;
        let event = KeyEvent {
            kind: KeyEventKind::Added,
            account: signer.account.clone(),
            device,
            key: new_key.to_vec(),
            // The signed statement covers the client's time, so the entry keeps that time.
            time_ms,
            authorization: Authorization::Enrollment {
                signer: signer.device,
                signature: signature.to_vec(),
                new_key_signature: new_key_signature.to_vec(),
            },
        };
        let change = DirectoryChange::Enroll {
            signer: signer.device,
            record,
        };
        match self.store.write_key_event(&event, &change).await? {
            KeyEventOutcome::Appended { index, device } => {
                tracing::info!(device = %device.device, by = %signer.device, index, "device enrolled");
                Ok((device, index))
            }
            KeyEventOutcome::AlreadyRegistered(_) => Err(LoginError::KeyInUse(device)),
        }
    }

    /// Adds a device holding `new_key` to the passkey account `account`, on the strength of
    /// the access token `token_id` that the caller has checked. The new key signs
    /// [`key_event_statement`] for the addition at `time_ms`, and the node signs
    /// [`passkey_grant_statement`] over it with `keyring`. Returns the new record and its log
    /// index.
    pub async fn enroll_by_token(
        &self,
        account: &str,
        token_id: &str,
        new_key: &[u8],
        time_ms: u64,
        new_key_signature: &[u8],
        keyring: &Keyring,
    ) -> Result<(DeviceRecord, u64), LoginError> {
        let now = check_time(time_ms)?;
        let parsed = parse_key(new_key)?;
        let device = DeviceId::for_key(new_key);
        let statement = key_event_statement(
            KeyEventKind::Added,
            &self.server_name,
            account,
            &device,
            new_key,
            time_ms,
        );
        verify(&parsed, &statement, new_key_signature)
            .map_err(|()| LoginError::BadStatementSignature(device))?;
        let (kid, node_signature) = keyring.sign(&passkey_grant_statement(&statement, token_id));
        let record = DeviceRecord {
            device,
            account: account.to_owned(),
            public_key: new_key.to_vec(),
            registered_at_ms: now,
            kt_index: None,
            revoked_at_ms: None,
        };
        let event = KeyEvent {
            kind: KeyEventKind::Added,
            account: account.to_owned(),
            device,
            key: new_key.to_vec(),
            time_ms,
            authorization: Authorization::PasskeyToken {
                token_id: token_id.to_owned(),
                kid,
                node_signature,
                new_key_signature: new_key_signature.to_vec(),
            },
        };
        match self
            .store
            .write_key_event(&event, &DirectoryChange::EnrollByToken(record))
            .await?
        {
            KeyEventOutcome::Appended { index, device } => {
                tracing::info!(device = %device.device, index, "device enrolled by passkey token");
                Ok((device, index))
            }
            KeyEventOutcome::AlreadyRegistered(_) => Err(LoginError::KeyInUse(device)),
        }
    }

    /// Replaces `previous` with a device holding `new_key`. Both keys sign
    /// [`key_event_statement`] for the rotation at `time_ms`; the old device is revoked and its
    /// KeyPackages are deleted. Returns the new record and its log index.
    pub async fn rotate(
        &self,
        previous: &DeviceRecord,
        new_key: &[u8],
        time_ms: u64,
        previous_signature: &[u8],
        new_key_signature: &[u8],
    ) -> Result<(DeviceRecord, u64), LoginError> {
        let record = self.signed_new_device(
            KeyEventKind::Rotated,
            previous,
            new_key,
            time_ms,
            previous_signature,
            new_key_signature,
        )?;
        let device = record.device;
        let event = KeyEvent {
            kind: KeyEventKind::Rotated,
            account: previous.account.clone(),
            device,
            key: new_key.to_vec(),
            time_ms,
            authorization: Authorization::Rotation {
                previous: previous.device,
                previous_signature: previous_signature.to_vec(),
                new_key_signature: new_key_signature.to_vec(),
            },
        };
        let change = DirectoryChange::Rotate {
            previous: previous.device,
            new: record,
        };
        match self.store.write_key_event(&event, &change).await? {
            KeyEventOutcome::Appended { index, device } => {
                self.store
                    .write_done(Change::RemoveKeyPackages {
                        device: previous.device,
                    })
                    .await?;
                tracing::info!(previous = %previous.device, device = %device.device, index, "device key rotated");
                Ok((device, index))
            }
            KeyEventOutcome::AlreadyRegistered(_) => Err(LoginError::KeyInUse(device)),
        }
    }

    /// Checks an enrollment or rotation that `signer` and the new key both signed with
    /// [`key_event_statement`] at `time_ms`, and returns the record of the new device.
    fn signed_new_device(
        &self,
        kind: KeyEventKind,
        signer: &DeviceRecord,
        new_key: &[u8],
        time_ms: u64,
        signature: &[u8],
        new_key_signature: &[u8],
    ) -> Result<DeviceRecord, LoginError> {
        let now = check_time(time_ms)?;
        let parsed_new = parse_key(new_key)?;
        let device = DeviceId::for_key(new_key);
        let statement = key_event_statement(
            kind,
            &self.server_name,
            &signer.account,
            &device,
            new_key,
            time_ms,
        );
        verify(&parse_key(&signer.public_key)?, &statement, signature)
            .map_err(|()| LoginError::BadStatementSignature(signer.device))?;
        verify(&parsed_new, &statement, new_key_signature)
            .map_err(|()| LoginError::BadStatementSignature(device))?;
        Ok(DeviceRecord {
            device,
            account: signer.account.clone(),
            public_key: new_key.to_vec(),
            registered_at_ms: now,
            kt_index: None,
            revoked_at_ms: None,
        })
    }

    /// Validates and stores KeyPackages uploaded by a logged-in device. Nothing is stored if any
    /// of them is invalid.
    pub async fn upload_key_packages(
        &self,
        device: &DeviceRecord,
        one_time: &[Vec<u8>],
        last_resort: Option<&[u8]>,
    ) -> Result<(u32, u32), LoginError> {
        let now = now_ms() / 1000;
        let check = |bytes: &[u8]| {
            validate_key_package(
                bytes,
                device.device,
                &device.public_key,
                &device.account,
                now,
            )
        };
        let one_time: Vec<KeyPackageRecord> = one_time
            .iter()
            .map(|b| check(b))
            .collect::<Result<_, _>>()?;
        let last_resort = last_resort.map(check).transpose()?.map(|mut r| {
            r.last_resort = true;
            r
        });
        let stored = one_time.len() as u32 + u32::from(last_resort.is_some());
        let available = self
            .store
            .write_key_packages(&device.device, one_time, last_resort)
            .await?;
        Ok((stored, available))
    }

    /// Claims a KeyPackage of an active device. Returns it with the device record, whose
    /// `kt_index` names the log entry that published the key.
    pub async fn claim_key_package(
        &self,
        device: &DeviceId,
    ) -> Result<(KeyPackageRecord, DeviceRecord), LoginError> {
        let record = self
            .store
            .device(device)?
            .ok_or(LoginError::DeviceNotFound(*device))?;
        if record.revoked_at_ms.is_some() {
            return Err(LoginError::Revoked(*device));
        }
        let key_package = self
            .store
            .write_claim(device, now_ms() / 1000)
            .await?
            .ok_or(LoginError::NoKeyPackage(*device))?;
        Ok((key_package, record))
    }

    /// Returns the device if it is registered and not revoked.
    pub fn active_device(&self, device: &DeviceId) -> Result<Option<DeviceRecord>, LoginError> {
        Ok(self
            .store
            .device(device)?
            .filter(|d| d.revoked_at_ms.is_none()))
    }

    /// Lists the devices of an account.
    pub fn devices(&self, account: &str) -> Result<Vec<DeviceRecord>, LoginError> {
        if !valid_account(account) {
            return Err(LoginError::InvalidAccount(
                account.chars().take(80).collect(),
            ));
        }
        Ok(self.store.account_devices(account)?)
    }
}

fn parse_key(bytes: &[u8]) -> Result<VerifyingKey, LoginError> {
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| LoginError::BadKey)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| LoginError::BadKey)
}

fn verify(key: &VerifyingKey, message: &[u8], signature: &[u8]) -> Result<(), ()> {
    let signature = Signature::from_slice(signature).map_err(|_| ())?;
    key.verify_strict(message, &signature).map_err(|_| ())
}

/// Checks a statement's time against the server clock and returns the server time.
fn check_time(time_ms: u64) -> Result<u64, LoginError> {
    let now = now_ms();
    if time_ms.abs_diff(now) > MAX_STATEMENT_SKEW_MS {
        return Err(LoginError::StaleStatement {
            time_ms,
            now_ms: now,
        });
    }
    Ok(now)
}

/// Returns whether `name` is a valid account name: 1 to 64 bytes of `[a-z0-9._-]`.
pub fn valid_account(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ACCOUNT_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}
