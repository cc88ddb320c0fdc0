//! The client's state file: written to a temporary file, fsync'd and renamed over the old one,
//! so a crash leaves either the old or the new state.

use crate::ClientError;
use crate::kt::KtState;
use atlas_protocol::receipts::SignedReceipt;
use openmls_basic_credential::SignatureKeyPair;
use openmls_memory_storage::MemoryStorage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

const STATE_FILE: &str = "client-state.msgpack";
const STATE_VERSION: u32 = 1;

/// Client state of one group beyond the MLS state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct GroupLocal {
    /// Highest log position processed.
    pub(crate) cursor: u64,
    /// Own entries acknowledged ahead of the cursor, with their plaintext (none for commits).
    pub(crate) own: BTreeMap<u64, Option<String>>,
    /// True once this device was removed.
    pub(crate) removed: bool,
    /// Texts of own messages sent but not yet acknowledged, by client message id, so that a
    /// message whose acknowledgement was lost is still recorded when sync meets it.
    #[serde(default)]
    pub(crate) unacknowledged: BTreeMap<[u8; 16], String>,
    /// Messages in log order: `(seq, sender account, text)`.
    pub(crate) transcript: Vec<(u64, String, String)>,
    /// Verified receipts of this device's own entries, by sequence number.
    #[serde(default)]
    pub(crate) receipts: BTreeMap<u64, SignedReceipt>,
    /// Sequence number and digest ([`crate::entry_digest`]) of the last entry this device
    /// read or sent. A sync from that entry checks that the server still has it.
    #[serde(default)]
    pub(crate) last_read: Option<(u64, [u8; 32])>,
    /// The description of how the server's log of the group contradicted this device. Once
    /// set, the device neither reads nor writes the group through the server.
    #[serde(default)]
    pub(crate) conflict: Option<String>,
    /// Digests ([`crate::entry_digest`]) of the entries in `own`, by sequence number. When the
    /// cursor moves over one, `last_read` names it, so a sync checks the server's entry there.
    #[serde(default)]
    pub(crate) own_digests: BTreeMap<u64, [u8; 32]>,
}

impl GroupLocal {
    pub(crate) fn record(&mut self, seq: u64, account: &str, text: Option<String>) {
        if let Some(text) = text {
            self.transcript.push((seq, account.to_owned(), text));
        }
    }

    /// Moves the cursor over own entries acknowledged while older entries were unprocessed,
    /// since they follow the cursor directly, and records their texts.
    pub(crate) fn take_own_entries(&mut self, account: &str) {
        while let Some(text) = self.own.remove(&(self.cursor + 1)) {
            self.cursor += 1;
            // States written before the digests were kept have none: the next sync then
            // compares nothing at the cursor.
            self.last_read = self
                .own_digests
                .remove(&self.cursor)
                .map(|digest| (self.cursor, digest));
            self.record(self.cursor, account, text);
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(crate) struct SavedState {
    version: u32,
    pub(crate) account: String,
    #[serde(with = "serde_bytes")]
    signer: Vec<u8>,
    pub(crate) groups: BTreeMap<Vec<u8>, GroupLocal>,
    mls: BTreeMap<serde_bytes::ByteBuf, serde_bytes::ByteBuf>,
    /// Key transparency heads and keys seen; absent in states written before it existed.
    #[serde(default)]
    pub(crate) kt: KtState,
}

fn state_error(path: &Path, detail: impl std::fmt::Display) -> ClientError {
    ClientError::State {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

impl SavedState {
    pub(crate) fn capture(
        account: &str,
        signer: &SignatureKeyPair,
        storage: &MemoryStorage,
        groups: &BTreeMap<Vec<u8>, GroupLocal>,
        kt: &KtState,
    ) -> Result<Self, ClientError> {
        let signer = serde_json::to_vec(signer).map_err(|e| ClientError::Mls(e.to_string()))?;
        let values = storage.values.read().unwrap_or_else(|p| p.into_inner());
        let mls = values
            .iter()
            .map(|(k, v)| {
                (
                    serde_bytes::ByteBuf::from(k.clone()),
                    serde_bytes::ByteBuf::from(v.clone()),
                )
            })
            .collect();
        Ok(Self {
            version: STATE_VERSION,
            account: account.to_owned(),
            signer,
            groups: groups.clone(),
            mls,
            kt: kt.clone(),
        })
    }

    pub(crate) fn exists(dir: &Path) -> bool {
        dir.join(STATE_FILE).is_file()
    }

    pub(crate) fn load(dir: &Path) -> Result<Option<Self>, ClientError> {
        let path = dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(state_error(&path, e)),
        };
        let state: Self = rmp_serde::from_slice(&bytes)
            .map_err(|e| state_error(&path, format!("corrupt state file: {e}")))?;
        if state.version != STATE_VERSION {
            return Err(state_error(
                &path,
                format!(
                    "state version {} is not supported, expected {STATE_VERSION}",
                    state.version
                ),
            ));
        }
        Ok(Some(state))
    }

    pub(crate) fn signer(&self) -> Result<SignatureKeyPair, ClientError> {
        serde_json::from_slice(&self.signer)
            .map_err(|e| ClientError::Mls(format!("stored device key: {e}")))
    }

    pub(crate) fn restore_storage(&self, storage: &MemoryStorage) {
        let mut values = storage.values.write().unwrap_or_else(|p| p.into_inner());
        for (k, v) in &self.mls {
            values.insert(k.to_vec(), v.to_vec());
        }
    }

    pub(crate) fn store(&self, dir: &Path) -> Result<(), ClientError> {
        let path = dir.join(STATE_FILE);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let bytes = rmp_serde::to_vec_named(self).map_err(|e| state_error(&path, e))?;
        let mut file = std::fs::File::create(&tmp).map_err(|e| state_error(&tmp, e))?;
        file.write_all(&bytes).map_err(|e| state_error(&tmp, e))?;
        file.sync_all().map_err(|e| state_error(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| state_error(&path, e))?;
        Ok(())
    }
}
