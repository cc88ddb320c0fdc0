//! Passkey accounts and refresh tokens.
//!
//! An account record lives in the `directory` tree under `A` + account name, beside the
//! devices, so that creating an account and registering a first device by open registration
//! see each other under the key transparency append lock. Passkeys are stored as opaque bytes
//! (the serialized webauthn-rs `Passkey`): this crate does not interpret them.
//!
//! `C` + credential id maps each registered passkey to its account, so that one credential
//! cannot be registered twice.
//!
//! Refresh tokens live in the `tokens` tree: `R` + SHA-256 of the token maps to a
//! [`RefreshRecord`], `F` + family id to a [`TokenFamily`]. A token is stored only as its hash.

use crate::atomic::WriteSet;
use crate::transparency::{account_devices_prefix, account_prefix};
use crate::{StorageError, Store, decode, encode};
use serde::{Deserialize, Serialize};

/// Maximum number of passkeys one account may hold.
pub const MAX_PASSKEYS_PER_ACCOUNT: usize = 16;

/// One passkey of an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasskeyRecord {
    #[serde(with = "serde_bytes")]
    pub credential_id: Vec<u8>,
    /// The passkey as the relying-party library serialized it, counter included.
    #[serde(with = "serde_bytes")]
    pub passkey: Vec<u8>,
    pub created_ms: u64,
    pub last_used_ms: Option<u64>,
}

/// An account created by a passkey registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub account: String,
    /// WebAuthn user handle: random, so that it reveals nothing about the account name.
    pub user_id: [u8; 16],
    pub created_ms: u64,
    pub passkeys: Vec<PasskeyRecord>,
}

/// A refresh token, stored under its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshRecord {
    pub account: String,
    /// Thumbprint of the DPoP key the token is bound to.
    pub jkt: String,
    /// Every token issued from one login shares a family; reusing a spent one revokes it.
    pub family: [u8; 16],
    pub expires_ms: u64,
    /// Set when the token was exchanged for a new one.
    pub spent_ms: Option<u64>,
}

/// State of a chain of refresh tokens: every token issued from one passkey login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenFamily {
    pub account: String,
    pub created_ms: u64,
    pub revoked_ms: Option<u64>,
    /// Passkey of the login; removing the passkey revokes the family.
    #[serde(with = "serde_bytes", default)]
    pub credential_id: Vec<u8>,
    /// Time of the passkey ceremony, for requests that need a recent one.
    #[serde(default)]
    pub auth_time_ms: u64,
}

/// Result of [`Store::spend_refresh_token`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The token was valid; it is now spent and `next` is stored in its place.
    Rotated(RefreshRecord),
    /// No such token.
    Unknown,
    /// The token has expired.
    Expired,
    /// The token was spent before: its whole family is now revoked.
    Reused { family: [u8; 16] },
    /// The token's family was revoked earlier.
    Revoked,
}

fn account_key(account: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(account.len() + 1);
    key.push(b'A');
    key.extend_from_slice(account.as_bytes());
    key
}

fn refresh_key(hash: &[u8; 32]) -> Vec<u8> {
    let mut key = Vec::with_capacity(33);
    key.push(b'R');
    key.extend_from_slice(hash);
    key
}

fn credential_key(credential_id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(credential_id.len() + 1);
    key.push(b'C');
    key.extend_from_slice(credential_id);
    key
}

fn family_key(family: &[u8; 16]) -> Vec<u8> {
    let mut key = Vec::with_capacity(17);
    key.push(b'F');
    key.extend_from_slice(family);
    key
}

impl Store {
    /// Creates a passkey account. Fails with [`StorageError::AccountTaken`] when the name has
    /// an account record or any key transparency entry (devices registered without passkeys,
    /// even if all were revoked), and with [`StorageError::CredentialInUse`] when one of its
    /// passkeys is registered already.
    pub fn create_account(&self, record: &AccountRecord) -> Result<(), StorageError> {
        let _append = self.lock_directory()?;
        let taken = self.kt.get(account_key(&record.account))?.is_some()
            || self
                .kt
                .scan_prefix(account_prefix(&record.account))
                .next()
                .is_some()
            || self
                .kt
                .scan_prefix(account_devices_prefix(&record.account))
                .next()
                .is_some();
        if taken {
            return Err(StorageError::AccountTaken(record.account.clone()));
        }
        let mut batch = WriteSet::new(&self.kt);
        self.stage_credentials(&mut batch, None, record)?;
        batch.insert(account_key(&record.account), encode(record));
        self.atomic.apply(batch)?;
        Ok(())
    }

    /// Adds the credential index changes from `before` to `after` to `batch`.
    fn stage_credentials(
        &self,
        batch: &mut WriteSet,
        before: Option<&AccountRecord>,
        after: &AccountRecord,
    ) -> Result<(), StorageError> {
        let had =
            |id: &[u8]| before.is_some_and(|b| b.passkeys.iter().any(|p| p.credential_id == id));
        for passkey in &after.passkeys {
            if had(&passkey.credential_id) {
                continue;
            }
            if self
                .kt
                .get(credential_key(&passkey.credential_id))?
                .is_some()
            {
                return Err(StorageError::CredentialInUse);
            }
            batch.insert(
                credential_key(&passkey.credential_id),
                after.account.as_bytes(),
            );
        }
        for passkey in before.map(|b| b.passkeys.as_slice()).unwrap_or_default() {
            if !after
                .passkeys
                .iter()
                .any(|p| p.credential_id == passkey.credential_id)
            {
                batch.remove(credential_key(&passkey.credential_id));
            }
        }
        Ok(())
    }

    /// Reads an account record.
    pub fn account(&self, account: &str) -> Result<Option<AccountRecord>, StorageError> {
        self.kt
            .get(account_key(account))?
            .map(|raw| decode(&raw, "account record", &account))
            .transpose()
    }

    /// Applies `change` to the stored record of `account` under the directory lock and
    /// stores the result. `change` may reject the update by returning an error, which is
    /// passed on.
    pub fn update_account<E: From<StorageError>>(
        &self,
        account: &str,
        change: impl FnOnce(&mut AccountRecord) -> Result<(), E>,
    ) -> Result<AccountRecord, E> {
        let _append = self.lock_directory()?;
        let before = self
            .account(account)?
            .ok_or_else(|| StorageError::UnknownAccount(account.to_owned()))?;
        let mut record = before.clone();
        change(&mut record)?;
        let mut batch = WriteSet::new(&self.kt);
        self.stage_credentials(&mut batch, Some(&before), &record)?;
        batch.insert(account_key(account), encode(&record));
        self.atomic.apply(batch)?;
        Ok(record)
    }

    /// Replaces the record `before` of an account with `after`. Fails with
    /// [`StorageError::Conflict`] when the stored record is not `before` any more.
    pub(crate) fn replace_account(
        &self,
        before: &AccountRecord,
        after: &AccountRecord,
    ) -> Result<AccountRecord, StorageError> {
        let _append = self.lock_directory()?;
        let stored = self
            .account(&before.account)?
            .ok_or_else(|| StorageError::UnknownAccount(before.account.clone()))?;
        if &stored != before || after.account != before.account {
            return Err(StorageError::Conflict(format!(
                "account {:?} changed meanwhile",
                before.account
            )));
        }
        let mut batch = WriteSet::new(&self.kt);
        self.stage_credentials(&mut batch, Some(before), after)?;
        batch.insert(account_key(&after.account), encode(after));
        self.atomic.apply(batch)?;
        Ok(after.clone())
    }

    /// Stores the first refresh token of a new login and its family.
    pub fn put_refresh_token(
        &self,
        hash: &[u8; 32],
        record: &RefreshRecord,
        family: &TokenFamily,
    ) -> Result<(), StorageError> {
        let _tokens = self.lock_tokens()?;
        let mut batch = WriteSet::new(&self.tokens);
        batch.insert(family_key(&record.family), encode(family));
        batch.insert(refresh_key(hash), encode(record));
        self.atomic.apply(batch)?;
        Ok(())
    }

    /// Revokes every token family of `account` that a login with `credential_id` started.
    /// Returns how many were revoked.
    pub fn revoke_credential_logins(
        &self,
        account: &str,
        credential_id: &[u8],
        now_ms: u64,
    ) -> Result<usize, StorageError> {
        let _tokens = self.lock_tokens()?;
        let mut revoked = 0;
        for item in self.tokens.scan_prefix([b'F']) {
            let (key, raw) = item?;
            let mut family: TokenFamily = decode(&raw, "token family", &"revocation")?;
            if family.account == account
                && family.credential_id == credential_id
                && family.revoked_ms.is_none()
            {
                family.revoked_ms = Some(now_ms);
                self.tokens.insert(key, encode(&family))?;
                revoked += 1;
            }
        }
        Ok(revoked)
    }

    /// Spends the refresh token with `hash` and stores `next_hash` with `make_next`'s record
    /// in the same family, in one step. A token spent before revokes its family.
    pub fn spend_refresh_token(
        &self,
        hash: &[u8; 32],
        now_ms: u64,
        next_hash: &[u8; 32],
        make_next: impl FnOnce(&RefreshRecord) -> RefreshRecord,
    ) -> Result<RefreshOutcome, StorageError> {
        let _tokens = self.lock_tokens()?;
        let Some(raw) = self.tokens.get(refresh_key(hash))? else {
            return Ok(RefreshOutcome::Unknown);
        };
        let mut record: RefreshRecord = decode(&raw, "refresh token", &"family")?;
        let family = self.token_family(&record.family)?;
        if family.as_ref().is_none_or(|f| f.revoked_ms.is_some()) {
            return Ok(RefreshOutcome::Revoked);
        }
        if record.spent_ms.is_some() {
            self.revoke_family_locked(&record.family, now_ms)?;
            return Ok(RefreshOutcome::Reused {
                family: record.family,
            });
        }
        if record.expires_ms <= now_ms {
            return Ok(RefreshOutcome::Expired);
        }
        let next = make_next(&record);
        record.spent_ms = Some(now_ms);
        let mut batch = WriteSet::new(&self.tokens);
        batch.insert(refresh_key(hash), encode(&record));
        batch.insert(refresh_key(next_hash), encode(&next));
        self.atomic.apply(batch)?;
        Ok(RefreshOutcome::Rotated(next))
    }

    /// Reads a token family; access tokens name theirs, so revoking it ends them too.
    pub fn token_family(&self, family: &[u8; 16]) -> Result<Option<TokenFamily>, StorageError> {
        self.tokens
            .get(family_key(family))?
            .map(|raw| decode(&raw, "token family", &hex_id(family)))
            .transpose()
    }

    /// Revokes every token of `family`.
    pub fn revoke_token_family(&self, family: &[u8; 16], now_ms: u64) -> Result<(), StorageError> {
        let _tokens = self.lock_tokens()?;
        self.revoke_family_locked(family, now_ms)
    }

    fn revoke_family_locked(&self, family: &[u8; 16], now_ms: u64) -> Result<(), StorageError> {
        let Some(mut record) = self.token_family(family)? else {
            return Ok(());
        };
        if record.revoked_ms.is_none() {
            record.revoked_ms = Some(now_ms);
            self.tokens.insert(family_key(family), encode(&record))?;
        }
        Ok(())
    }

    /// Deletes refresh tokens that expired before `now_ms`. Returns how many were deleted.
    pub fn prune_refresh_tokens(&self, now_ms: u64) -> Result<usize, StorageError> {
        let _tokens = self.lock_tokens()?;
        let mut removed = 0;
        for item in self.tokens.scan_prefix([b'R']) {
            let (key, raw) = item?;
            let record: RefreshRecord = decode(&raw, "refresh token", &"prune")?;
            if record.expires_ms <= now_ms {
                self.tokens.remove(key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn hex_id(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
