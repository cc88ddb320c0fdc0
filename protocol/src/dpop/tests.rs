use super::*;

const URI: &str = "https://localhost:8443/v1/devices";
const NOW: u64 = 1_800_000_000;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn claims() -> DpopClaims {
    DpopClaims {
        jti: "jti-1".into(),
        htm: "POST".into(),
        htu: URI.into(),
        iat: NOW,
        ath: None,
        nonce: None,
    }
}

fn request(access_token: Option<&str>) -> ProofRequest<'_> {
    ProofRequest {
        method: "POST",
        uri: URI,
        access_token,
        now_s: NOW,
        window_s: 60,
        future_s: 10,
        websocket: false,
    }
}

fn encode_part(value: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

#[test]
fn valid_proof_returns_thumbprint() {
    let key = key(1);
    let proof = sign_proof(&key, &claims());
    let checked = verify_proof(&proof, &request(None)).unwrap();
    assert_eq!(checked.jkt, ed25519_jkt(&key));
    assert_eq!(checked.jti, "jti-1");
    assert_eq!(checked.iat, NOW);
}

#[test]
fn made_proof_carries_ath_and_nonce() {
    let key = key(2);
    let proof = make_proof(
        &key,
        &ProofParams {
            method: "POST",
            uri: URI,
            access_token: Some("token"),
            nonce: Some("n-1"),
            now_s: NOW,
        },
    );
    let checked = verify_proof(&proof, &request(Some("token"))).unwrap();
    assert_eq!(checked.nonce.as_deref(), Some("n-1"));
    assert_eq!(checked.jti.len(), 22, "16 random bytes in base64url");
}

#[test]
fn websocket_uri_matches_https_form() {
    let mut c = claims();
    c.htm = "GET".into();
    c.htu = "wss://LOCALHOST:8443/v1/ws?x=1".into();
    let proof = sign_proof(&key(1), &c);
    let req = ProofRequest {
        method: "GET",
        uri: "https://localhost:8443/v1/ws",
        websocket: true,
        ..request(None)
    };
    assert!(verify_proof(&proof, &req).is_ok());
    // Only a WebSocket upgrade accepts the wss form.
    let plain = ProofRequest {
        websocket: false,
        ..req
    };
    assert!(matches!(
        verify_proof(&proof, &plain),
        Err(DpopError::WrongUri { .. })
    ));
}

#[test]
fn small_clock_skew_accepted() {
    for iat in [NOW - 60, NOW + 10] {
        let mut c = claims();
        c.iat = iat;
        assert!(
            verify_proof(&sign_proof(&key(1), &c), &request(None)).is_ok(),
            "{iat}"
        );
    }
}

#[test]
fn wrong_method_rejected() {
    let mut c = claims();
    c.htm = "GET".into();
    let err = verify_proof(&sign_proof(&key(1), &c), &request(None)).unwrap_err();
    assert!(matches!(err, DpopError::WrongMethod { .. }), "{err}");
}

#[test]
fn wrong_uri_rejected() {
    for htu in [
        "https://localhost:8443/v1/token",
        "https://localhost:9443/v1/devices",
        "https://example.com:8443/v1/devices",
        "http://localhost:8443/v1/devices",
        "not a uri",
    ] {
        let mut c = claims();
        c.htu = htu.into();
        let err = verify_proof(&sign_proof(&key(1), &c), &request(None)).unwrap_err();
        assert!(matches!(err, DpopError::WrongUri { .. }), "{htu}: {err}");
    }
}

#[test]
fn stale_and_future_iat_rejected() {
    for iat in [NOW - 61, NOW + 11] {
        let mut c = claims();
        c.iat = iat;
        let err = verify_proof(&sign_proof(&key(1), &c), &request(None)).unwrap_err();
        assert!(matches!(err, DpopError::Stale { .. }), "{iat}: {err}");
    }
}

#[test]
fn ath_must_match_token() {
    let mut c = claims();
    c.ath = Some(access_token_hash("other token"));
    let proof = sign_proof(&key(1), &c);
    assert_eq!(
        verify_proof(&proof, &request(Some("token"))).unwrap_err(),
        DpopError::WrongAth
    );
    assert_eq!(
        verify_proof(&proof, &request(None)).unwrap_err(),
        DpopError::UnexpectedAth
    );
    let without = sign_proof(&key(1), &claims());
    assert_eq!(
        verify_proof(&without, &request(Some("token"))).unwrap_err(),
        DpopError::MissingAth
    );
}

#[test]
fn wrong_typ_rejected() {
    let key = key(1);
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = Some("JWT".into());
    header.jwk = Some(ed25519_jwk(&key));
    let proof = sign_jwt(&key, &header, &claims());
    let err = verify_proof(&proof, &request(None)).unwrap_err();
    assert_eq!(err, DpopError::WrongType(Some("JWT".into())));
    assert_eq!(
        err.to_string(),
        "the DPoP proof has typ \"JWT\", expected \"dpop+jwt\""
    );
}

#[test]
fn missing_jwk_rejected() {
    let key = key(1);
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = Some(DPOP_TYP.into());
    let proof = sign_jwt(&key, &header, &claims());
    assert_eq!(
        verify_proof(&proof, &request(None)).unwrap_err(),
        DpopError::MissingKey
    );
}

#[test]
fn signature_by_other_key_rejected() {
    // The header names key 2, but key 1 signed.
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = Some(DPOP_TYP.into());
    header.jwk = Some(ed25519_jwk(&key(2)));
    let proof = sign_jwt(&key(1), &header, &claims());
    assert_eq!(
        verify_proof(&proof, &request(None)).unwrap_err(),
        DpopError::BadSignature
    );
}

#[test]
fn private_key_in_jwk_rejected() {
    let key = key(1);
    let header = serde_json::json!({
        "typ": DPOP_TYP,
        "alg": "EdDSA",
        "jwk": {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
            "d": URL_SAFE_NO_PAD.encode(key.to_bytes()),
        },
    });
    let signing_input = format!(
        "{}.{}",
        encode_part(&header),
        encode_part(&serde_json::to_value(claims()).unwrap())
    );
    use ed25519_dalek::Signer;
    let signature = key.sign(signing_input.as_bytes());
    let proof = format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    );
    let err = verify_proof(&proof, &request(None)).unwrap_err();
    assert!(matches!(err, DpopError::BadKey(_)), "{err}");
}

#[test]
fn unsigned_and_symmetric_proofs_rejected() {
    let header = serde_json::json!({"typ": DPOP_TYP, "alg": "none"});
    let body = encode_part(&serde_json::to_value(claims()).unwrap());
    let unsigned = format!("{}.{body}.", encode_part(&header));
    assert!(verify_proof(&unsigned, &request(None)).is_err());

    let header = serde_json::json!({"typ": DPOP_TYP, "alg": "HS256"});
    let hmac = format!("{}.{body}.AAAA", encode_part(&header));
    let err = verify_proof(&hmac, &request(None)).unwrap_err();
    assert!(matches!(err, DpopError::UnsupportedAlgorithm(_)), "{err}");
}

#[test]
fn oversized_and_garbage_proofs_rejected() {
    let long = "a".repeat(MAX_PROOF_BYTES + 1);
    assert_eq!(
        verify_proof(&long, &request(None)).unwrap_err(),
        DpopError::TooLong
    );
    let err = verify_proof("not.a.jwt", &request(None)).unwrap_err();
    assert!(matches!(err, DpopError::Malformed(_)), "{err}");
}

#[test]
fn empty_jti_rejected() {
    let mut c = claims();
    c.jti = String::new();
    assert_eq!(
        verify_proof(&sign_proof(&key(1), &c), &request(None)).unwrap_err(),
        DpopError::BadJti
    );
}

#[test]
fn proof_from_external_signer_verifies() {
    use ed25519_dalek::Signer;
    let key = key(3);
    let params = ProofParams {
        method: "POST",
        uri: URI,
        access_token: None,
        nonce: None,
        now_s: NOW,
    };
    let proof = make_proof_with(
        key.verifying_key().as_bytes(),
        |input| Ok::<_, ()>(key.sign(input).to_bytes().to_vec()),
        &params,
    )
    .unwrap();
    let checked = verify_proof(&proof, &request(None)).unwrap();
    assert_eq!(checked.jkt, ed25519_jkt(&key));
}

#[test]
fn crit_header_rejected() {
    let key = key(4);
    let header = serde_json::json!({
        "typ": DPOP_TYP,
        "alg": "EdDSA",
        "crit": ["exp"],
        "jwk": {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes()),
        },
    });
    let signing_input = format!(
        "{}.{}",
        encode_part(&header),
        encode_part(&serde_json::to_value(claims()).unwrap())
    );
    use ed25519_dalek::Signer;
    let proof = format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(key.sign(signing_input.as_bytes()).to_bytes())
    );
    assert_eq!(
        verify_proof(&proof, &request(None)).unwrap_err(),
        DpopError::CriticalHeader
    );
}

#[test]
fn control_characters_never_reach_messages() {
    let mut c = claims();
    c.htu = "https://localhost:8443/x\nFORGED LOG LINE".into();
    let err = verify_proof(&sign_proof(&key(1), &c), &request(None)).unwrap_err();
    let text = err.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(text.contains("FORGED"), "{text}");
}
