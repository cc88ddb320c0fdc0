//! Devices, accounts and KeyPackages: login verification and KeyPackage handling.

use crate::group::now_ms;
use crate::mls::{MlsError, validate_key_package};
use atlas_protocol::{DeviceId, ErrorCode, login_transcript};
use atlas_storage::{DeviceRecord, KeyPackageRecord, Registration, StorageError, Store};
use ed25519_dalek::{Signature, VerifyingKey};

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
    /// Storage failed.
    #[error(transparent)]
    Storage(StorageError),
}

impl From<StorageError> for LoginError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::DeviceOwnedElsewhere { device, .. } => Self::WrongAccount { device },
            other => Self::Storage(other),
        }
    }
}

impl LoginError {
    /// Returns the error code sent to the client.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidAccount(_) | Self::WrongAccount { .. } => ErrorCode::InvalidAccount,
            Self::BadKey | Self::BadSignature(_) => ErrorCode::BadSignature,
            Self::KeyPackage(_) => ErrorCode::InvalidKeyPackage,
            Self::DeviceNotFound(_) => ErrorCode::DeviceNotFound,
            Self::NoKeyPackage(_) => ErrorCode::NoKeyPackage,
            Self::Storage(_) => ErrorCode::StorageFailure,
        }
    }
}

/// Device and KeyPackage directory over the store.
#[derive(Clone)]
pub struct Directory {
    store: Store,
}

impl Directory {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Verifies a login signature over the transcript of `server_name` and `nonce`, then
    /// registers the key under `account` if it is new. Returns the device record and whether
    /// this login registered it.
    ///
    /// NOTE: registration is open: any new key may claim any unused account name. Passkey
    /// enrolment is meant to replace this.
    pub fn login(
        &self,
        account: &str,
        device_key: &[u8],
        signature: &[u8],
        server_name: &str,
        nonce: &[u8],
    ) -> Result<(DeviceRecord, bool), LoginError> {
        if !valid_account(account) {
            return Err(LoginError::InvalidAccount(
                account.chars().take(80).collect(),
            ));
        }
        let key_bytes: [u8; 32] = device_key.try_into().map_err(|_| LoginError::BadKey)?;
        let key = VerifyingKey::from_bytes(&key_bytes).map_err(|_| LoginError::BadKey)?;
        let device = DeviceId::for_key(device_key);
        let signature =
            Signature::from_slice(signature).map_err(|_| LoginError::BadSignature(device))?;
        key.verify_strict(&login_transcript(server_name, nonce), &signature)
            .map_err(|_| LoginError::BadSignature(device))?;
        let record = DeviceRecord {
            device,
            account: account.to_owned(),
            public_key: device_key.to_vec(),
            registered_at_ms: now_ms(),
        };
        match self.store.register_device(&record)? {
            Registration::New => Ok((record, true)),
            Registration::Existing(existing) => Ok((existing, false)),
        }
    }

    /// Validates and stores KeyPackages uploaded by a logged-in device. Nothing is stored if any
    /// of them is invalid.
    pub fn upload_key_packages(
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
        let available =
            self.store
                .put_key_packages(&device.device, &one_time, last_resort.as_ref())?;
        Ok((
            one_time.len() as u32 + u32::from(last_resort.is_some()),
            available,
        ))
    }

    /// Claims a KeyPackage of a device.
    pub fn claim_key_package(&self, device: &DeviceId) -> Result<KeyPackageRecord, LoginError> {
        if self.store.device(device)?.is_none() {
            return Err(LoginError::DeviceNotFound(*device));
        }
        self.store
            .claim_key_package(device, now_ms() / 1000)?
            .ok_or(LoginError::NoKeyPackage(*device))
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

fn valid_account(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ACCOUNT_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}
