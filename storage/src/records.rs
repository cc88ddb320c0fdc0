use atlas_protocol::DeviceId;
use serde::{Deserialize, Serialize};

/// Per-group counters stored next to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    /// Current MLS epoch of the group.
    pub epoch: u64,
    /// Highest sequence number assigned (0 before the first entry).
    pub last_seq: u64,
    /// Lowest sequence number still stored; lower ones were removed by retention.
    pub first_seq: u64,
    /// Server time the group was created, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device: DeviceId,
    pub account: String,
    /// Ed25519 public key (32 bytes), also the device's MLS signature key.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    pub registered_at_ms: u64,
    /// Index of the key transparency entry that published this key.
    #[serde(default)]
    pub kt_index: Option<u64>,
    /// Time the device was revoked or replaced by a rotation; it can no longer log in.
    #[serde(default)]
    pub revoked_at_ms: Option<u64>,
}

/// A validated KeyPackage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPackageRecord {
    /// The KeyPackage's hash reference, its unique id.
    #[serde(with = "serde_bytes")]
    pub hash_ref: Vec<u8>,
    /// The MLSMessage bytes as uploaded.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// Lifetime bounds in seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
    pub last_resort: bool,
    pub device: DeviceId,
}

impl KeyPackageRecord {
    /// True when `now_secs` lies inside the KeyPackage's lifetime.
    pub fn valid_at(&self, now_secs: u64) -> bool {
        self.not_before <= now_secs && now_secs < self.not_after
    }
}
