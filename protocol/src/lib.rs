//! Atlas wire protocol: the frames that travel as WebSocket binary messages, their MessagePack
//! encoding, the error and close codes, and the size limits. This crate does no I/O.
//!
//! Every frame is a MessagePack map `{v, id, body}` where `v` is [`PROTOCOL_VERSION`], `id` is
//! the request id chosen by the client (echoed in the response, 0 for server pushes) and `body`
//! is one of [`ClientBody`] or [`ServerBody`]. `docs/protocol.md` describes every frame.

pub mod accounts;
mod codes;
pub mod dpop;
mod frames;
mod ids;
pub mod receipts;
pub mod transparency;

pub use codes::{CloseCode, ErrorCode};
pub use frames::{
    Accepted, ClientBody, ClientFrame, DecodeError, DeviceInfo, EntryKind, LogEntry, ServerBody,
    ServerFrame, WelcomeEntry, decode_client, decode_server, encode_client, encode_server,
};
pub use ids::{ClientMsgId, DeviceId, GroupId, IdError};

/// Version carried in every frame. A frame with another version gets
/// [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u16 = 1;

/// Maximum size of one WebSocket message (one frame), in bytes.
pub const MAX_FRAME_BYTES: usize = 256 * 1024;

/// Maximum size of one MLS message (commit, application message or Welcome), in bytes.
pub const MAX_MLS_MESSAGE_BYTES: usize = 200 * 1024;

/// Maximum number of KeyPackages in one upload.
pub const MAX_KEY_PACKAGES_PER_UPLOAD: usize = 100;

/// Maximum number of log entries returned by one sync.
pub const MAX_SYNC_ENTRIES: u32 = 500;

/// Domain-separation prefix of the login signature; see [`login_transcript`].
pub const LOGIN_CONTEXT: &[u8] = b"atlas-device-login-v2";

/// Builds the bytes a device signs to log in: the context string, the server name the client
/// connected to, the server's fresh nonce and the account name, each length-prefixed so no two
/// inputs collide. The first login of a key is kept in the key transparency log as the proof
/// that the key holder chose that account.
pub fn login_transcript(server_name: &str, nonce: &[u8], account: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        LOGIN_CONTEXT.len() + server_name.len() + nonce.len() + account.len() + 16,
    );
    for part in [
        LOGIN_CONTEXT,
        server_name.as_bytes(),
        nonce,
        account.as_bytes(),
    ] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}
