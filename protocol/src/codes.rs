//! Stable error codes carried in error frames and WebSocket close codes.

use serde::{Deserialize, Serialize};

/// Error code of an error frame. The numeric values are part of the protocol and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u16", try_from = "u16")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame is not valid MessagePack or does not match any frame shape.
    MalformedFrame,
    /// The frame's `v` is not a protocol version this server speaks.
    UnsupportedVersion,
    /// The frame's body type is not known to this server.
    UnknownFrameType,
    /// The frame exceeds [`crate::MAX_FRAME_BYTES`] or a field exceeds its limit.
    TooLarge,
    /// A field is out of its valid range, such as a tree size larger than the log.
    InvalidRequest,
    /// A request other than login arrived before the device logged in.
    NotAuthenticated,
    /// The login signature did not verify, or it signed another nonce.
    BadSignature,
    /// The account name is invalid or already owns the device key under another name.
    InvalidAccount,
    /// The MLS message could not be parsed or failed MLS validation.
    InvalidMlsMessage,
    /// The KeyPackage failed validation.
    InvalidKeyPackage,
    /// The group does not exist on this server.
    GroupNotFound,
    /// A group with this id already exists.
    GroupExists,
    /// The sender's device is not a member of the group.
    NotMember,
    /// The message is for an epoch other than the group's current one. The error carries the
    /// current epoch, so the client can catch up and retry.
    StaleEpoch,
    /// No KeyPackage is available for the requested device.
    NoKeyPackage,
    /// The device or account does not exist.
    DeviceNotFound,
    /// The device was revoked or replaced by a key rotation; it cannot log in or be added.
    DeviceRevoked,
    /// The device key is not enrolled in an account, and the server does not register keys
    /// at login. Enroll it with a passkey session or from a current device.
    DeviceNotEnrolled,
    /// The server cannot store the change (disk full, corruption); nothing was written.
    StorageFailure,
    /// The request is valid but names a feature this server does not implement.
    Unsupported,
    /// The server is shutting down or overloaded; retry later or on another node.
    Unavailable,
    /// An unexpected server fault; the request may be retried.
    Internal,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [Self; 22] = [
        Self::MalformedFrame,
        Self::UnsupportedVersion,
        Self::UnknownFrameType,
        Self::TooLarge,
        Self::InvalidRequest,
        Self::NotAuthenticated,
        Self::BadSignature,
        Self::InvalidAccount,
        Self::InvalidMlsMessage,
        Self::InvalidKeyPackage,
        Self::GroupNotFound,
        Self::GroupExists,
        Self::NotMember,
        Self::StaleEpoch,
        Self::NoKeyPackage,
        Self::DeviceNotFound,
        Self::DeviceRevoked,
        Self::DeviceNotEnrolled,
        Self::StorageFailure,
        Self::Unsupported,
        Self::Unavailable,
        Self::Internal,
    ];

    /// Returns the numeric value sent on the wire.
    pub fn as_u16(self) -> u16 {
        match self {
            Self::MalformedFrame => 1000,
            Self::UnsupportedVersion => 1001,
            Self::UnknownFrameType => 1002,
            Self::TooLarge => 1003,
            Self::InvalidRequest => 1004,
            Self::NotAuthenticated => 1100,
            Self::BadSignature => 1101,
            Self::InvalidAccount => 1102,
            Self::InvalidMlsMessage => 1200,
            Self::InvalidKeyPackage => 1201,
            Self::GroupNotFound => 1300,
            Self::GroupExists => 1301,
            Self::NotMember => 1302,
            Self::StaleEpoch => 1303,
            Self::NoKeyPackage => 1400,
            Self::DeviceNotFound => 1401,
            Self::DeviceRevoked => 1402,
            Self::DeviceNotEnrolled => 1403,
            Self::StorageFailure => 1500,
            Self::Unsupported => 1501,
            Self::Unavailable => 1502,
            Self::Internal => 1503,
        }
    }

    /// Returns a short snake_case name, used as a metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Self::MalformedFrame => "malformed_frame",
            Self::UnsupportedVersion => "unsupported_version",
            Self::UnknownFrameType => "unknown_frame_type",
            Self::TooLarge => "too_large",
            Self::InvalidRequest => "invalid_request",
            Self::NotAuthenticated => "not_authenticated",
            Self::BadSignature => "bad_signature",
            Self::InvalidAccount => "invalid_account",
            Self::InvalidMlsMessage => "invalid_mls_message",
            Self::InvalidKeyPackage => "invalid_key_package",
            Self::GroupNotFound => "group_not_found",
            Self::GroupExists => "group_exists",
            Self::NotMember => "not_member",
            Self::StaleEpoch => "stale_epoch",
            Self::NoKeyPackage => "no_key_package",
            Self::DeviceNotFound => "device_not_found",
            Self::DeviceRevoked => "device_revoked",
            Self::DeviceNotEnrolled => "device_not_enrolled",
            Self::StorageFailure => "storage_failure",
            Self::Unsupported => "unsupported",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> Self {
        code.as_u16()
    }
}

impl TryFrom<u16> for ErrorCode {
    type Error = String;

    fn try_from(value: u16) -> Result<Self, Self::Error> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_u16() == value)
            .ok_or_else(|| format!("unknown error code {value}"))
    }
}

/// WebSocket close codes the server sends (RFC 6455 private range 4000-4999 plus standard ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: the session ended normally.
    Normal,
    /// 1001: the server is shutting down; reconnect to this or another node later.
    GoingAway,
    /// 1009: a message exceeded [`crate::MAX_FRAME_BYTES`].
    TooBig,
    /// 1013: too many connections are waiting to log in; retry later.
    TryAgainLater,
    /// 4001: login failed or did not arrive in time, or the logged-in device was revoked.
    AuthFailed,
    /// 4002: the peer missed keepalive pings.
    KeepaliveTimeout,
    /// 4003: too many invalid frames in a row; the peer looks broken or hostile.
    ProtocolViolation,
    /// 4008: the outbound queue filled because the client reads too slowly; resync from the
    /// cursor after reconnecting.
    SlowConsumer,
    /// 4009: the same device logged in on another connection, which replaces this one.
    Replaced,
}

impl CloseCode {
    /// Returns the numeric WebSocket close code.
    pub fn as_u16(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::TooBig => 1009,
            Self::TryAgainLater => 1013,
            Self::AuthFailed => 4001,
            Self::KeepaliveTimeout => 4002,
            Self::ProtocolViolation => 4003,
            Self::SlowConsumer => 4008,
            Self::Replaced => 4009,
        }
    }
}
