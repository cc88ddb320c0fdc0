use super::*;
use crate::transparency::Jwk;
use ed25519_dalek::{Signer as _, SigningKey};

/// The Ed25519 test key of RFC 9421 appendix B.1.4, as PKCS#8 DER in base64 (the seed is its
/// last 32 bytes), and its public key.
const RFC_KEY_PKCS8: &str = "MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF";
const RFC_PUBLIC_KEY: &str = "JrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=";

/// Signature base and signature of RFC 9421 appendix B.2.6.
const RFC_PARAMS: &str = r#"("date" "@method" "@path" "@authority" "content-type" "content-length");created=1618884473;keyid="test-key-ed25519""#;
const RFC_BASE: &str = "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n\"@method\": POST\n\"@path\": /foo\n\"@authority\": example.com\n\"content-type\": application/json\n\"content-length\": 18\n\"@signature-params\": (\"date\" \"@method\" \"@path\" \"@authority\" \"content-type\" \"content-length\");created=1618884473;keyid=\"test-key-ed25519\"";
const RFC_SIGNATURE: &str =
    "wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==";

fn rfc_seed() -> [u8; 32] {
    let der = STANDARD.decode(RFC_KEY_PKCS8).unwrap();
    der[der.len() - 32..].try_into().unwrap()
}

#[test]
fn rfc_9421_ed25519_example() {
    let lines = [
        ("date", "Tue, 20 Apr 2021 02:07:55 GMT"),
        ("@method", "POST"),
        ("@path", "/foo"),
        ("@authority", "example.com"),
        ("content-type", "application/json"),
        ("content-length", "18"),
    ];
    let components: Vec<HttpMessageComponent> = lines
        .iter()
        .map(|(name, value)| {
            let id = HttpMessageComponentId::try_from(format!("\"{name}\"").as_str()).unwrap();
            HttpMessageComponent::try_from((&id, [value.to_string()].as_slice())).unwrap()
        })
        .collect();
    let params = HttpSignatureParams::try_from(RFC_PARAMS).unwrap();
    let base = HttpSignatureBase::try_new(&components, &params).unwrap();
    assert_eq!(base.to_string(), RFC_BASE);

    let public = STANDARD.decode(RFC_PUBLIC_KEY).unwrap();
    let dalek = SigningKey::from_bytes(&rfc_seed());
    assert_eq!(dalek.verifying_key().to_bytes().to_vec(), public);

    // Ed25519 (RFC 8032) is deterministic: ed25519-dalek, which the node signs with, gives the
    // RFC's signature exactly. httpsig verifies it.
    let rfc_signature = STANDARD.decode(RFC_SIGNATURE).unwrap();
    assert_eq!(
        dalek.sign(RFC_BASE.as_bytes()).to_bytes().to_vec(),
        rfc_signature
    );
    let key = PublicKey::from_bytes(&AlgorithmName::Ed25519, &public).unwrap();
    assert!(httpsig::prelude::VerifyingKey::verify(&key, &base.as_bytes(), &rfc_signature).is_ok());

    let mut tampered = rfc_signature.clone();
    tampered[0] ^= 1;
    assert!(httpsig::prelude::VerifyingKey::verify(&key, &base.as_bytes(), &tampered).is_err());
}

fn fields() -> ReceiptFields {
    ReceiptFields::new(
        GroupId::new(b"team".to_vec()).unwrap(),
        42,
        DeviceId::from_bytes([5; 16]),
        1_700_000_000_123,
        b"ciphertext bytes",
    )
}

fn jwks(kid: &str, seed: &[u8; 32]) -> Jwks {
    Jwks {
        keys: vec![Jwk::ed25519(
            kid,
            &SigningKey::from_bytes(seed).verifying_key(),
        )],
    }
}

#[test]
fn receipt_verifies_with_jwks() {
    let receipt = fields()
        .sign("k1", &SigningKey::from_bytes(&[3; 32]), 1_700_000_000)
        .unwrap();
    assert!(
        receipt
            .signature_input
            .starts_with("atlas=(\"@status\" \"content-digest\"")
    );
    assert!(
        receipt
            .signature_input
            .contains(";alg=\"ed25519\";keyid=\"k1\";tag=\"atlas-receipt\"")
    );
    assert_eq!(fields().verify(&receipt, &jwks("k1", &[3; 32])), Ok(()));
    assert_eq!(fields().check_ciphertext(b"ciphertext bytes"), Ok(()));
}

#[test]
fn signature_base_lists_every_field() {
    let receipt = fields()
        .sign("k1", &SigningKey::from_bytes(&[3; 32]), 1_700_000_000)
        .unwrap();
    let params = receipt.signature_input.strip_prefix("atlas=").unwrap();
    let base = fields().signature_base(params).unwrap();
    let expected = format!(
        "\"@status\": 200\n\"content-digest\": {}\n\"atlas-group\": 7465616d\n\"atlas-seq\": 42\n\
         \"atlas-sender\": 05050505050505050505050505050505\n\"atlas-accepted-at\": 1700000000123\n\
         \"@signature-params\": {params}",
        content_digest(b"ciphertext bytes")
    );
    assert_eq!(base, expected);
}

#[test]
fn changed_field_fails() {
    let receipt = fields()
        .sign("k1", &SigningKey::from_bytes(&[3; 32]), 1_700_000_000)
        .unwrap();
    let keys = jwks("k1", &[3; 32]);
    let changes: Vec<(&str, ReceiptFields)> = vec![
        (
            "group",
            ReceiptFields {
                group: GroupId::new(b"teak".to_vec()).unwrap(),
                ..fields()
            },
        ),
        (
            "seq",
            ReceiptFields {
                seq: 43,
                ..fields()
            },
        ),
        (
            "sender",
            ReceiptFields {
                sender: DeviceId::from_bytes([6; 16]),
                ..fields()
            },
        ),
        (
            "time",
            ReceiptFields {
                accepted_at_ms: 1_700_000_000_124,
                ..fields()
            },
        ),
        (
            "digest",
            ReceiptFields::new(
                fields().group,
                42,
                fields().sender,
                fields().accepted_at_ms,
                b"ciphertext byteS",
            ),
        ),
    ];
    for (name, changed) in changes {
        assert_eq!(
            changed.verify(&receipt, &keys),
            Err(ReceiptError::BadSignature),
            "{name}"
        );
    }
}

#[test]
fn flipped_ciphertext_byte_fails() {
    let original = b"ciphertext bytes".to_vec();
    for i in 0..original.len() {
        let mut flipped = original.clone();
        flipped[i] ^= 0x01;
        assert!(matches!(
            fields().check_ciphertext(&flipped),
            Err(ReceiptError::DigestMismatch { .. })
        ));
    }
}

#[test]
fn wrong_key_or_parameters_fail() {
    let receipt = fields()
        .sign("k1", &SigningKey::from_bytes(&[3; 32]), 1_700_000_000)
        .unwrap();
    assert_eq!(
        fields().verify(&receipt, &jwks("k2", &[3; 32])),
        Err(ReceiptError::UnknownKey("k1".into()))
    );
    assert_eq!(
        fields().verify(&receipt, &jwks("k1", &[4; 32])),
        Err(ReceiptError::BadSignature)
    );

    let fewer = Receipt {
        signature_input: receipt.signature_input.replace(" \"atlas-sender\"", ""),
        ..receipt.clone()
    };
    assert!(matches!(
        fields().verify(&fewer, &jwks("k1", &[3; 32])),
        Err(ReceiptError::WrongComponents { .. })
    ));

    let untagged = Receipt {
        signature_input: receipt
            .signature_input
            .replace(";tag=\"atlas-receipt\"", ""),
        ..receipt.clone()
    };
    assert!(matches!(
        fields().verify(&untagged, &jwks("k1", &[3; 32])),
        Err(ReceiptError::WrongParameter { name: "tag", .. })
    ));

    let relabelled = Receipt {
        signature_input: receipt.signature_input.replacen("atlas=", "other=", 1),
        signature: receipt.signature.replacen("atlas=", "other=", 1),
    };
    assert_eq!(
        fields().verify(&relabelled, &jwks("k1", &[3; 32])),
        Err(ReceiptError::MissingLabel)
    );

    // Inputs that httpsig would normalise to the signed base are still rejected.
    let variants = [
        receipt
            .signature_input
            .replace(";tag=", ";foo=\"bar\";tag="),
        receipt
            .signature_input
            .replace(";alg=\"ed25519\"", ";tag=\"evil\";alg=\"ed25519\""),
        receipt
            .signature_input
            .replace("\"atlas-seq\"", "atlas-seq"),
    ];
    for input in variants {
        let altered = Receipt {
            signature_input: input.clone(),
            ..receipt.clone()
        };
        assert!(
            matches!(
                fields().verify(&altered, &jwks("k1", &[3; 32])),
                Err(ReceiptError::NotCanonical { .. } | ReceiptError::Malformed(_))
            ),
            "{input}"
        );
    }
    let two_signatures = Receipt {
        signature: format!("{}, x=:AAAA:", receipt.signature),
        signature_input: format!("{}, x=(\"@status\")", receipt.signature_input),
    };
    assert!(
        fields()
            .verify(&two_signatures, &jwks("k1", &[3; 32]))
            .is_err()
    );

    let garbage = Receipt {
        signature_input: "not a dictionary (".into(),
        signature: receipt.signature,
    };
    assert!(matches!(
        fields().verify(&garbage, &jwks("k1", &[3; 32])),
        Err(ReceiptError::Malformed(_))
    ));
}

/// RFC 9530 Appendix B.1: `{"hello": "world"}` followed by LF; Appendix B.2: the
/// `Content-Digest` of a HEAD response, computed over empty content.
#[test]
fn content_digest_matches_rfc_9530_examples() {
    assert_eq!(
        content_digest(b"{\"hello\": \"world\"}\n"),
        "sha-256=:RK/0qy18MlBSVnWgjwz6lZEWjP/lF5HF9bvEF8FabDg=:"
    );
    assert_eq!(
        content_digest(b""),
        "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
    );
}
