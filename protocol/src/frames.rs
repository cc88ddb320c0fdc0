//! Frame types and their MessagePack codec.

use crate::receipts::{Receipt, ReceiptFields};
use crate::transparency::{ConsistencyProof, Jwks, ProvenEntry, SignedTreeHead};
use crate::{ClientMsgId, DeviceId, ErrorCode, GroupId, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Protocol version, [`PROTOCOL_VERSION`].
    pub v: u16,
    /// Request id, echoed in the server's response.
    pub id: u64,
    /// The request.
    pub body: ClientBody,
}

/// A frame sent by the server: a response (`id` of the request) or a push (`id` 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerFrame {
    /// Protocol version, [`PROTOCOL_VERSION`].
    pub v: u16,
    /// Request id of the request this frame responds to, or 0 for pushes and the login challenge.
    pub id: u64,
    /// The response or push.
    pub body: ServerBody,
}

/// Requests a client can send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum ClientBody {
    /// Responds to the server's challenge and signs [`crate::login_transcript`] with the device key.
    /// The first login of an unknown key registers it under `account`.
    Login {
        account: String,
        #[serde(with = "serde_bytes")]
        device_key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// Stores one-time KeyPackages and optionally replaces the last-resort one.
    UploadKeyPackages {
        key_packages: Vec<serde_bytes::ByteBuf>,
        last_resort: Option<serde_bytes::ByteBuf>,
    },
    /// Lists the devices registered under an account.
    ListDevices { account: String },
    /// Claims one KeyPackage of a device, to add it to a group.
    ClaimKeyPackage { device: DeviceId },
    /// Registers a new group from its creator's GroupInfo (MLSMessage with the ratchet tree).
    CreateGroup {
        group: GroupId,
        #[serde(with = "serde_bytes")]
        group_info: Vec<u8>,
    },
    /// Submits a commit (MLS PublicMessage) and the Welcome for the devices it adds.
    Commit {
        group: GroupId,
        msg_id: ClientMsgId,
        #[serde(with = "serde_bytes")]
        commit: Vec<u8>,
        welcome: Option<serde_bytes::ByteBuf>,
    },
    /// Submits an application message (MLS PrivateMessage).
    Send {
        group: GroupId,
        msg_id: ClientMsgId,
        #[serde(with = "serde_bytes")]
        message: Vec<u8>,
    },
    /// Fetches log entries with sequence numbers above `after`.
    Sync {
        group: GroupId,
        after: u64,
        limit: u32,
    },
    /// Records that this device has processed the group's entries up to `seq`.
    Ack { group: GroupId, seq: u64 },
    /// Lists Welcome messages waiting for this device.
    Welcomes,
    /// Application-level ping. The server replies with [`ServerBody::Pong`].
    Ping,
    /// Revokes a device of this device's account (or this device itself). `signature` is this
    /// device's signature over [`crate::transparency::key_event_statement`] for the revocation.
    RevokeDevice {
        device: DeviceId,
        time_ms: u64,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
    },
    /// Adds a device with `new_key` to this device's account. This device signs
    /// [`crate::transparency::key_event_statement`] for the addition (kind `added`, the new
    /// device id and key, `time_ms`), and so does the new key (`new_key_signature`).
    EnrollDevice {
        #[serde(with = "serde_bytes")]
        new_key: Vec<u8>,
        time_ms: u64,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
        #[serde(with = "serde_bytes")]
        new_key_signature: Vec<u8>,
    },
    /// Replaces this device's key with `new_key`. Both keys sign
    /// [`crate::transparency::key_event_statement`] for the rotation, naming the new device id.
    /// The server closes the connection after the response; log in again with the new key.
    RotateDeviceKey {
        #[serde(with = "serde_bytes")]
        new_key: Vec<u8>,
        time_ms: u64,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
        #[serde(with = "serde_bytes")]
        new_key_signature: Vec<u8>,
    },
    /// Fetches a freshly signed receipt for entry `seq` of a group this device belongs to.
    Receipt { group: GroupId, seq: u64 },
    /// Fetches the node's signing keys. Allowed before login.
    Jwks,
    /// Fetches the latest signed tree head of the key transparency log. Allowed before login.
    KtHead,
    /// Fetches the entries that published an account's current device keys, with inclusion
    /// proofs. Allowed before login.
    KtLookup { account: String },
    /// Fetches the key events of an account from log index `start` on, with inclusion proofs,
    /// as many as fit in one page. Allowed before login.
    KtHistory { account: String, start: u64 },
    /// Fetches up to `limit` log entries from index `start`, with inclusion proofs. Allowed
    /// before login.
    KtEntries { start: u64, limit: u32 },
    /// Fetches a consistency proof between two tree sizes. Allowed before login.
    KtConsistency { from: u64, to: u64 },
}

impl ClientBody {
    /// Frame type names, as they appear in the `t` field.
    pub const TYPES: [&'static str; 21] = [
        "login",
        "upload_key_packages",
        "list_devices",
        "claim_key_package",
        "create_group",
        "commit",
        "send",
        "sync",
        "ack",
        "welcomes",
        "ping",
        "enroll_device",
        "revoke_device",
        "rotate_device_key",
        "receipt",
        "jwks",
        "kt_head",
        "kt_lookup",
        "kt_history",
        "kt_entries",
        "kt_consistency",
    ];

    /// True for requests that read only public data and so are allowed before login.
    pub fn is_public(&self) -> bool {
        matches!(
            self,
            Self::Ping
                | Self::Jwks
                | Self::KtHead
                | Self::KtLookup { .. }
                | Self::KtHistory { .. }
                | Self::KtEntries { .. }
                | Self::KtConsistency { .. }
        )
    }

    /// Returns the `t` name of this body, used as a metrics label.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Login { .. } => "login",
            Self::UploadKeyPackages { .. } => "upload_key_packages",
            Self::ListDevices { .. } => "list_devices",
            Self::ClaimKeyPackage { .. } => "claim_key_package",
            Self::CreateGroup { .. } => "create_group",
            Self::Commit { .. } => "commit",
            Self::Send { .. } => "send",
            Self::Sync { .. } => "sync",
            Self::Ack { .. } => "ack",
            Self::Welcomes => "welcomes",
            Self::Ping => "ping",
            Self::EnrollDevice { .. } => "enroll_device",
            Self::RevokeDevice { .. } => "revoke_device",
            Self::RotateDeviceKey { .. } => "rotate_device_key",
            Self::Receipt { .. } => "receipt",
            Self::Jwks => "jwks",
            Self::KtHead => "kt_head",
            Self::KtLookup { .. } => "kt_lookup",
            Self::KtHistory { .. } => "kt_history",
            Self::KtEntries { .. } => "kt_entries",
            Self::KtConsistency { .. } => "kt_consistency",
        }
    }
}

/// Responses and pushes the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum ServerBody {
    /// First frame of every connection: the nonce to sign and the server name to include.
    Challenge {
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        server_name: String,
        max_frame_bytes: u32,
    },
    /// Login succeeded; the connection now acts for `device`.
    LoggedIn {
        device: DeviceId,
        account: String,
        /// True when this login registered the device.
        registered: bool,
    },
    /// KeyPackages stored; `available` counts this device's unclaimed one-time KeyPackages.
    KeyPackagesStored { stored: u32, available: u32 },
    /// Devices of an account.
    Devices {
        account: String,
        devices: Vec<DeviceInfo>,
    },
    /// A claimed KeyPackage (MLSMessage bytes), with the key transparency entry that
    /// published the device's key and its inclusion proof to `head`.
    KeyPackage {
        device: DeviceId,
        #[serde(with = "serde_bytes")]
        key_package: Vec<u8>,
        last_resort: bool,
        proof: ProvenEntry,
        head: SignedTreeHead,
    },
    /// The group was registered at `epoch`.
    GroupCreated { group: GroupId, epoch: u64 },
    /// The commit or message is durably stored under `seq`.
    Accepted(Accepted),
    /// Log entries of a sync, in sequence order.
    Entries {
        group: GroupId,
        entries: Vec<LogEntry>,
        /// Highest sequence number assigned in the group.
        head: u64,
        /// Lowest sequence number still stored; entries below it were removed by retention.
        first_available: u64,
    },
    /// The cursor was stored.
    Acked { group: GroupId, seq: u64 },
    /// Welcome messages waiting for this device.
    Welcomes { welcomes: Vec<WelcomeEntry> },
    /// Reply to [`ClientBody::Ping`].
    Pong,
    /// The request failed; nothing was written.
    Error {
        code: ErrorCode,
        message: String,
        /// The group's current epoch, set with [`ErrorCode::StaleEpoch`] and
        /// [`ErrorCode::NotMember`].
        epoch: Option<u64>,
    },
    /// A new entry in a group this device belongs to (`id` 0).
    Push { group: GroupId, entry: LogEntry },
    /// A new Welcome for this device (`id` 0).
    WelcomePush(WelcomeEntry),
    /// The device was enrolled by log entry `index`.
    DeviceEnrolled { device: DeviceId, index: u64 },
    /// The device was revoked by log entry `index`.
    DeviceRevoked { device: DeviceId, index: u64 },
    /// The key was rotated: `device` is the new device id, published by log entry `index`.
    KeyRotated { device: DeviceId, index: u64 },
    /// A receipt for a stored entry and the facts it signs.
    Receipt {
        fields: ReceiptFields,
        receipt: Receipt,
    },
    /// The node's signing keys.
    Jwks(Jwks),
    /// The latest signed tree head.
    KtHead(SignedTreeHead),
    /// Log entries with inclusion proofs to `head`: the response to a lookup, a history or
    /// an entries request.
    KtEntries {
        head: SignedTreeHead,
        entries: Vec<ProvenEntry>,
    },
    /// A consistency proof.
    KtConsistency(ConsistencyProof),
}

/// Acknowledgement of an accepted commit or application message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub group: GroupId,
    pub seq: u64,
    /// Epoch of the group after the entry was applied.
    pub epoch: u64,
    /// Server time of acceptance, in milliseconds since the Unix epoch.
    pub accepted_at_ms: u64,
    /// True when this acknowledges a retry of an already stored message.
    pub duplicate: bool,
    /// The node's signature over the entry's facts and ciphertext (see
    /// [`crate::receipts`]); the sender is the device this acknowledgement goes to.
    pub receipt: Receipt,
}

/// Kind of a log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// An MLS commit (PublicMessage) that moved the group to a new epoch.
    Commit,
    /// An MLS application message (PrivateMessage).
    Application,
}

/// One entry of a group's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub seq: u64,
    pub kind: EntryKind,
    /// Epoch the message was sent in.
    pub epoch: u64,
    pub sender: DeviceId,
    pub msg_id: ClientMsgId,
    pub accepted_at_ms: u64,
    /// The MLS message bytes, exactly as the sender submitted them.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub device: DeviceId,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
}

/// A Welcome waiting for a device: join `group` and read its log after `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WelcomeEntry {
    pub group: GroupId,
    /// Sequence number of the commit that added the device.
    pub seq: u64,
    #[serde(with = "serde_bytes")]
    pub welcome: Vec<u8>,
}

/// Reason a received frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame is longer than [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge(usize),
    /// Not MessagePack, or not a frame map.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The frame names a version this side does not speak.
    #[error("unsupported protocol version {0}, this side speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// The frame type is not known.
    #[error("unknown frame type {0:?}")]
    UnknownType(String, u64),
}

impl DecodeError {
    /// Returns the error code sent back for this decode failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::TooLarge(_) => ErrorCode::TooLarge,
            Self::Malformed(_) => ErrorCode::MalformedFrame,
            Self::Version(_) => ErrorCode::UnsupportedVersion,
            Self::UnknownType(..) => ErrorCode::UnknownFrameType,
        }
    }
}

/// Envelope read first, to tell an unknown frame type from a malformed frame.
#[derive(Deserialize)]
struct RawFrame {
    v: u16,
    id: u64,
    body: RawBody,
}

#[derive(Deserialize)]
struct RawBody {
    t: String,
}

/// Decodes a client frame, telling apart malformed input, a wrong version and unknown types.
pub fn decode_client(bytes: &[u8]) -> Result<ClientFrame, (u64, DecodeError)> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err((0, DecodeError::TooLarge(bytes.len())));
    }
    let raw: RawFrame =
        rmp_serde::from_slice(bytes).map_err(|e| (0, DecodeError::Malformed(e.to_string())))?;
    if raw.v != PROTOCOL_VERSION {
        return Err((raw.id, DecodeError::Version(raw.v)));
    }
    if !ClientBody::TYPES.contains(&raw.body.t.as_str()) {
        // Cut at a character boundary: the name comes from the peer and may be any UTF-8.
        let name: String = raw.body.t.chars().take(64).collect();
        return Err((raw.id, DecodeError::UnknownType(name, raw.id)));
    }
    rmp_serde::from_slice(bytes).map_err(|e| (raw.id, DecodeError::Malformed(e.to_string())))
}

/// Decodes a server frame.
pub fn decode_server(bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
    let frame: ServerFrame =
        rmp_serde::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if frame.v != PROTOCOL_VERSION {
        return Err(DecodeError::Version(frame.v));
    }
    Ok(frame)
}

/// Encodes a client frame as MessagePack with named fields.
pub fn encode_client(frame: &ClientFrame) -> Vec<u8> {
    // Serializing these plain data types into a Vec cannot fail: every map key is a string and
    // no type has a custom serializer that errors.
    rmp_serde::to_vec_named(frame).expect("client frame serializes")
}

/// Encodes a server frame as MessagePack with named fields.
pub fn encode_server(frame: &ServerFrame) -> Vec<u8> {
    // See `encode_client`: serialization of these types cannot fail.
    rmp_serde::to_vec_named(frame).expect("server frame serializes")
}

#[cfg(test)]
mod tests;
