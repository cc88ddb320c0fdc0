//! Key layout of the sled trees. Group ids are length-prefixed so that one group's keys never
//! share a prefix with another's; sequence numbers are big-endian so keys sort by sequence.

use atlas_protocol::{ClientMsgId, DeviceId, GroupId};

fn group_key(tag: u8, group: &GroupId, extra: usize) -> Vec<u8> {
    let id = group.as_bytes();
    let mut key = Vec::with_capacity(2 + id.len() + extra);
    key.push(tag);
    // Group ids are at most 64 bytes (checked by `GroupId::new`), so the length fits a byte.
    key.push(id.len() as u8);
    key.extend_from_slice(id);
    key
}

pub(crate) fn group_meta(group: &GroupId) -> Vec<u8> {
    group_key(b'm', group, 0)
}

pub(crate) fn group_state(group: &GroupId) -> Vec<u8> {
    group_key(b's', group, 0)
}

pub(crate) fn log(group: &GroupId, seq: u64) -> Vec<u8> {
    let mut key = group_key(b'l', group, 8);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Splits a key of the `groups` tree into the group id and sequence number of a log entry,
/// or returns `None` for a record of another kind.
pub(crate) fn log_entry_of(key: &[u8]) -> Option<(&[u8], u64)> {
    if key.first() != Some(&b'l') {
        return None;
    }
    let len = usize::from(*key.get(1)?);
    let id = key.get(2..2 + len)?;
    let seq = key.get(2 + len..)?.try_into().ok()?;
    Some((id, u64::from_be_bytes(seq)))
}

/// Exclusive upper bound of a group's log keys.
pub(crate) fn log_end(group: &GroupId) -> Vec<u8> {
    let mut key = group_key(b'l', group, 9);
    key.extend_from_slice(&[0xff; 9]);
    key
}

pub(crate) fn dedupe(group: &GroupId, sender: &DeviceId, msg_id: &ClientMsgId) -> Vec<u8> {
    let mut key = group_key(b'd', group, 32);
    key.extend_from_slice(sender.as_bytes());
    key.extend_from_slice(&msg_id.0);
    key
}

/// Key of the record of the commit that removed `device` from `group`: its sequence number.
pub(crate) fn departure(group: &GroupId, device: &DeviceId) -> Vec<u8> {
    let mut key = group_key(b'r', group, 16);
    key.extend_from_slice(device.as_bytes());
    key
}

/// First byte of the key of a Welcome in the `groups` tree.
pub(crate) const WELCOME_TAG: u8 = b'w';

/// Returns the device that a Welcome's key names.
pub(crate) fn welcome_device_of(key: &[u8]) -> Option<DeviceId> {
    let bytes: [u8; 16] = key.get(1..17)?.try_into().ok()?;
    Some(DeviceId::from_bytes(bytes))
}

pub(crate) fn welcome_prefix(device: &DeviceId) -> Vec<u8> {
    let mut key = vec![WELCOME_TAG];
    key.extend_from_slice(device.as_bytes());
    key
}

pub(crate) fn welcome(device: &DeviceId, group: &GroupId) -> Vec<u8> {
    let mut key = welcome_prefix(device);
    key.extend_from_slice(group.as_bytes());
    key
}

pub(crate) fn key_package_prefix(device: &DeviceId) -> Vec<u8> {
    let mut key = vec![b'k'];
    key.extend_from_slice(device.as_bytes());
    key
}

pub(crate) fn key_package(device: &DeviceId, hash_ref: &[u8]) -> Vec<u8> {
    let mut key = key_package_prefix(device);
    key.extend_from_slice(hash_ref);
    key
}

pub(crate) fn last_resort(device: &DeviceId) -> Vec<u8> {
    let mut key = vec![b'L'];
    key.extend_from_slice(device.as_bytes());
    key
}

pub(crate) fn cursor(device: &DeviceId, group: &GroupId) -> Vec<u8> {
    let mut key = device.as_bytes().to_vec();
    key.extend_from_slice(group.as_bytes());
    key
}

/// Returns the shard key of the record under `key` of tree `tree`: the id of its group, or
/// of the device whose KeyPackage it is. `None` for a record of neither.
pub(crate) fn shard_key_of<'k>(tree: &str, key: &'k [u8]) -> Option<&'k [u8]> {
    const DEVICE: usize = 16;
    match tree {
        "groups" => match key.first()? {
            b'm' | b's' | b'l' | b'd' | b'r' => {
                let len = usize::from(*key.get(1)?);
                key.get(2..2 + len)
            }
            b'w' => key.get(1 + DEVICE..),
            _ => None,
        },
        "cursors" => key.get(DEVICE..),
        "key_packages" => match key.first()? {
            b'k' | b'L' => key.get(1..1 + DEVICE),
            _ => None,
        },
        _ => None,
    }
}
