//! Identifier newtypes shared by the server and the client.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Errors from parsing or validating an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The group id is empty or longer than [`GroupId::MAX_LEN`] bytes.
    #[error("group id of {0} bytes is outside 1..={max}", max = GroupId::MAX_LEN)]
    GroupIdLength(usize),
    /// A device id must be exactly 16 bytes.
    #[error("device id of {0} bytes, expected 16")]
    DeviceIdLength(usize),
    /// A hex string did not decode.
    #[error("invalid hex in id {0:?}")]
    Hex(String),
}

/// An MLS group id as chosen by the group's creator (1 to 64 bytes).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GroupId(#[serde(with = "serde_bytes")] Vec<u8>);

impl GroupId {
    /// Maximum length of a group id in bytes.
    pub const MAX_LEN: usize = 64;

    /// Wraps group id bytes after checking their length.
    pub fn new(bytes: Vec<u8>) -> Result<Self, IdError> {
        if bytes.is_empty() || bytes.len() > Self::MAX_LEN {
            return Err(IdError::GroupIdLength(bytes.len()));
        }
        Ok(Self(bytes))
    }

    /// Parses the hex form printed by [`fmt::Display`]. The length is checked first, so an
    /// error quotes no more than twice [`GroupId::MAX_LEN`] characters.
    pub fn from_hex(text: &str) -> Result<Self, IdError> {
        if text.is_empty() || text.len() > 2 * Self::MAX_LEN {
            return Err(IdError::GroupIdLength(text.len().div_ceil(2)));
        }
        if !text.len().is_multiple_of(2) {
            return Err(IdError::Hex(text.to_owned()));
        }
        let bytes = text
            .as_bytes()
            .chunks(2)
            .map(|pair| {
                std::str::from_utf8(pair)
                    .ok()
                    .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                    .ok_or_else(|| IdError::Hex(text.to_owned()))
            })
            .collect::<Result<Vec<u8>, IdError>>()?;
        Self::new(bytes)
    }

    /// Checks the length of an id that arrived through deserialization, which bypasses
    /// [`GroupId::new`].
    pub fn validate(&self) -> Result<(), IdError> {
        if self.0.is_empty() || self.0.len() > Self::MAX_LEN {
            return Err(IdError::GroupIdLength(self.0.len()));
        }
        Ok(())
    }

    /// Returns the raw id bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupId({self})")
    }
}

/// A device id: the first 16 bytes of the SHA-256 of the device's Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceId(#[serde(with = "serde_bytes")] [u8; 16]);

impl DeviceId {
    /// Wraps 16 id bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// Parses the 32-character hex form printed by [`fmt::Display`].
    pub fn from_hex(text: &str) -> Result<Self, IdError> {
        if text.len() != 32 {
            return Err(IdError::DeviceIdLength(text.len() / 2));
        }
        let mut out = [0u8; 16];
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(chunk).map_err(|_| IdError::Hex(text.to_owned()))?;
            out[i] = u8::from_str_radix(pair, 16).map_err(|_| IdError::Hex(text.to_owned()))?;
        }
        Ok(Self(out))
    }

    /// Returns the raw id bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

/// A client-chosen message id that makes a send idempotent within its group and sender.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientMsgId(#[serde(with = "serde_bytes")] pub [u8; 16]);

impl DeviceId {
    /// Derives the id of the device whose Ed25519 public key is `public_key`.
    pub fn for_key(public_key: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(public_key);
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        Self(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_id_hex_round_trip() {
        let group = GroupId::new(vec![0, 0xab, 0xff]).unwrap();
        assert_eq!(GroupId::from_hex(&group.to_string()), Ok(group));
        assert_eq!(
            GroupId::from_hex("00ABff"),
            GroupId::new(vec![0, 0xab, 0xff])
        );
    }

    #[test]
    fn group_id_hex_errors() {
        assert_eq!(GroupId::from_hex(""), Err(IdError::GroupIdLength(0)));
        assert_eq!(
            GroupId::from_hex(&"a".repeat(10_000)),
            Err(IdError::GroupIdLength(5_000))
        );
        assert_eq!(GroupId::from_hex("abc"), Err(IdError::Hex("abc".into())));
        assert_eq!(GroupId::from_hex("zz"), Err(IdError::Hex("zz".into())));
        assert_eq!(GroupId::from_hex("é0"), Err(IdError::Hex("é0".into())));
    }
}
