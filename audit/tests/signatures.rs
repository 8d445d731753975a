//! Checkpoint signatures as an HSM makes them (raw ECDSA over the digest, high-S not normalised),
//! loading the public key, and verification rules on small hand-made trails.

mod common;

use common::{record, sign, signing_key, verifying_key};
use kms_audit::{
    checkpoint_message, checkpoint_signature_valid, verify, verifying_key_from_pem, verifying_key_from_sec1, Chain,
    Checkpoint, ProblemKind, StoredRecord, VerifyKeyError, GENESIS,
};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::Signature;
use p256::pkcs8::{EncodePublicKey, LineEnding};

fn sealed(n: u64) -> Vec<StoredRecord> {
    let mut head = Chain::new();
    (1..=n).map(|i| head.seal(record(i))).collect()
}

/// The same signature with `s` replaced by `n - s`: equally valid ECDSA, as an HSM may return.
fn flip_s(sig: &Signature) -> Signature {
    let (r, s) = sig.split_scalars();
    Signature::from_scalars(r.to_bytes(), (-*s).to_bytes()).unwrap()
}

#[test]
fn high_s_signatures_are_accepted() {
    let key = signing_key();
    let mut seen_high = false;
    for seq in 1..=8u64 {
        let c = sign(&key, seq, &[seq as u8; 32], 1);
        let sig = Signature::from_slice(&c.signature).unwrap();
        let (low, high) = match sig.normalize_s() {
            Some(low) => (low, sig),
            None => (sig, flip_s(&sig)),
        };
        assert!(high.normalize_s().is_some(), "high must be high-S");
        seen_high = true;
        for s in [low, high] {
            let c = Checkpoint { signature: s.to_bytes().to_vec(), ..c.clone() };
            assert!(checkpoint_signature_valid(&c, &verifying_key()));
        }
    }
    assert!(seen_high);
}

#[test]
fn signature_over_the_message_equals_signature_over_the_digest() {
    // The Verifier trait hashes the message with SHA-256; the HSM signs the digest directly.
    let key = signing_key();
    let hash = [9u8; 32];
    let via_message: Signature = key.sign(&checkpoint_message(4, &hash, 77));
    let c = Checkpoint { seq: 4, hash, time_unix_ms: 77, signature: via_message.to_bytes().to_vec() };
    assert!(checkpoint_signature_valid(&c, &verifying_key()));
    assert_eq!(sign(&key, 4, &hash, 77).signature, c.signature, "RFC 6979 makes both identical");
}

#[test]
fn malformed_signatures_are_invalid_not_errors() {
    let good = sign(&signing_key(), 3, &[1; 32], 5);
    for signature in [vec![], vec![0; 64], good.signature[..63].to_vec(), [good.signature.clone(), vec![0]].concat()] {
        let c = Checkpoint { signature, ..good.clone() };
        assert!(!checkpoint_signature_valid(&c, &verifying_key()));
    }
    for field in 0..3 {
        let mut c = good.clone();
        match field {
            0 => c.seq += 1,
            1 => c.hash[31] ^= 1,
            _ => c.time_unix_ms += 1,
        }
        assert!(!checkpoint_signature_valid(&c, &verifying_key()));
    }
}

#[test]
fn public_key_loads_from_pem_and_sec1() {
    let vk = verifying_key();
    let pem = vk.to_public_key_pem(LineEnding::LF).unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    assert_eq!(verifying_key_from_pem(&pem).unwrap(), vk);
    assert_eq!(verifying_key_from_pem(&format!("\n{pem}\n\n")).unwrap(), vk);
    assert!(matches!(verifying_key_from_pem("not a key"), Err(VerifyKeyError::Pem(_))));
    let private_pem = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
    assert!(verifying_key_from_pem(private_pem).is_err());

    let point = vk.to_encoded_point(false);
    assert_eq!(verifying_key_from_sec1(point.as_bytes()).unwrap(), vk);
    let mut off = point.as_bytes().to_vec();
    off[64] ^= 1;
    assert!(matches!(verifying_key_from_sec1(&off), Err(VerifyKeyError::Sec1(_))));
}

#[test]
fn empty_trail_and_genesis_checkpoint() {
    let report = verify(Vec::new(), &[], &verifying_key());
    assert!(report.is_intact());
    assert_eq!((report.records, report.uncovered), (0, None));

    let genesis = sign(&signing_key(), 0, &GENESIS, 1);
    let report = verify(sealed(3), &[genesis], &verifying_key());
    assert!(report.is_intact());
    assert_eq!(report.uncovered, Some((1, 3)));

    let wrong = sign(&signing_key(), 0, &[1; 32], 1);
    let report = verify(sealed(3), &[wrong], &verifying_key());
    assert_eq!(report.first_problem().unwrap().kind, ProblemKind::CheckpointMismatch);
    assert_eq!(report.first_problem().unwrap().seq, 0);

    let beyond = sign(&signing_key(), 2, &[1; 32], 1);
    let report = verify(Vec::new(), &[beyond], &verifying_key());
    assert_eq!(
        report.first_problem().unwrap().message,
        "the signed checkpoint at record 2 covers records that are gone: records 1..=2 were deleted"
    );
}

#[test]
fn checkpoints_may_come_in_any_order() {
    let records = sealed(25);
    let key = signing_key();
    let cps: Vec<Checkpoint> =
        [20u64, 10].iter().map(|&s| sign(&key, s, &records[s as usize - 1].hash, s as i64)).collect();
    let report = verify(records, &cps, &verifying_key());
    assert!(report.is_intact());
    assert_eq!((report.valid_checkpoints, report.uncovered), (2, Some((21, 25))));
}

#[test]
fn a_trail_starting_with_a_foreign_record_is_out_of_order() {
    let mut records = sealed(3);
    let mut zero = records[0].clone();
    zero.record.seq = 0;
    records.insert(0, zero);
    let report = verify(records, &[], &verifying_key());
    let p = report.first_problem().unwrap();
    assert_eq!((p.seq, p.kind), (0, ProblemKind::OutOfOrder));
    assert!(p.message.starts_with("record 0 appears at the start of the trail"));
}

#[test]
fn report_serialises_for_kmsctl() {
    let mut records = sealed(3);
    records.remove(1);
    let report = verify(records, &[], &verifying_key());
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["records"], 2);
    assert_eq!(json["problems"][0]["kind"], "missing");
    assert_eq!(json["problems"][0]["seq"], 2);
    assert_eq!(json["uncovered"], serde_json::Value::Null);
    assert_eq!(report.problems[0].to_string(), report.problems[0].message);
}
