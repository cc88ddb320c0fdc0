use super::*;
use crate::{ClientMsgId, GroupId};

fn frame(body: ClientBody) -> ClientFrame {
    ClientFrame {
        v: PROTOCOL_VERSION,
        id: 7,
        body,
    }
}

#[test]
fn client_frames_round_trip() {
    let group = GroupId::new(b"g1".to_vec()).unwrap();
    let bodies = [
        ClientBody::Ping,
        ClientBody::Welcomes,
        ClientBody::Send {
            group: group.clone(),
            msg_id: ClientMsgId([3; 16]),
            message: vec![1, 2],
        },
        ClientBody::Sync {
            group,
            after: 4,
            limit: 10,
        },
    ];
    for body in bodies {
        let f = frame(body);
        assert_eq!(decode_client(&encode_client(&f)).unwrap(), f);
    }
}

#[test]
fn unknown_type_is_not_malformed() {
    #[derive(serde::Serialize)]
    struct Body {
        t: &'static str,
    }
    #[derive(serde::Serialize)]
    struct Raw {
        v: u16,
        id: u64,
        body: Body,
    }
    let bytes = rmp_serde::to_vec_named(&Raw {
        v: 1,
        id: 9,
        body: Body { t: "teleport" },
    })
    .unwrap();
    let (id, err) = decode_client(&bytes).unwrap_err();
    assert_eq!(id, 9);
    assert_eq!(err.code(), ErrorCode::UnknownFrameType);
}

#[test]
fn long_unknown_type_with_multibyte_characters_is_cut_safely() {
    #[derive(serde::Serialize)]
    struct Body {
        t: String,
    }
    #[derive(serde::Serialize)]
    struct Raw {
        v: u16,
        id: u64,
        body: Body,
    }
    let t = format!("a{}", "é".repeat(100));
    let bytes = rmp_serde::to_vec_named(&Raw {
        v: 1,
        id: 3,
        body: Body { t },
    })
    .unwrap();
    let (_, err) = decode_client(&bytes).unwrap_err();
    let DecodeError::UnknownType(name, _) = err else {
        panic!("expected unknown type")
    };
    assert_eq!(name.chars().count(), 64);
}

#[test]
fn garbage_is_malformed() {
    let (_, err) = decode_client(&[0xc1, 0xff, 0x00]).unwrap_err();
    assert_eq!(err.code(), ErrorCode::MalformedFrame);
}

#[test]
fn wrong_version_is_reported() {
    let mut f = frame(ClientBody::Ping);
    f.v = 99;
    let (_, err) = decode_client(&encode_client(&f)).unwrap_err();
    assert_eq!(err, DecodeError::Version(99));
}

#[test]
fn oversized_frame_is_rejected_before_parsing() {
    let (_, err) = decode_client(&vec![0u8; MAX_FRAME_BYTES + 1]).unwrap_err();
    assert_eq!(err.code(), ErrorCode::TooLarge);
}

#[test]
fn error_codes_round_trip_and_are_unique() {
    let mut seen = std::collections::HashSet::new();
    for code in ErrorCode::ALL {
        assert!(seen.insert(code.as_u16()), "duplicate value for {code:?}");
        assert_eq!(ErrorCode::try_from(code.as_u16()).unwrap(), code);
    }
}

#[test]
fn device_id_hex_round_trips() {
    let id = DeviceId::from_bytes([0xab; 16]);
    assert_eq!(DeviceId::from_hex(&id.to_string()).unwrap(), id);
    assert!(DeviceId::from_hex("zz").is_err());
}
