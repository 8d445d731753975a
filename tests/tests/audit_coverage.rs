//! Every request is recorded, and no record grows with what a caller sends:
//! - a 100 KB or 600 KB key name is refused with a short message, logged and recorded bounded, and
//!   the trail stays readable (`ListAuditRecords`, `kmsctl audit export`);
//! - requests that never reach a handler (an unknown method, a body that does not decode) are
//!   recorded;
//! - each item of a `ReWrapBatch` is a record of its own; a re-wrap names its destination; caller
//!   changes name whom they changed and how; approval decisions name the request.

use kms_client::Delivery;
use kms_e2e::pb::{self, Classification as L};
use kms_e2e::{ctx, identity_of, made, pending, Settings, TestServer};
use tonic::Code;

fn records(server: &TestServer) -> Vec<kms_audit::AuditRecord> {
    kms_audit::AuditDb::open_read_only(&server.audit_path())
        .unwrap()
        .records(1, 100_000)
        .unwrap()
        .into_iter()
        .map(|r| r.record)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_key_name_is_refused_briefly_and_recorded_bounded_and_the_trail_stays_readable() {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    for size in [100_000, 600_000] {
        let name = "x".repeat(size);
        let err = officer.get_key(&name).await.unwrap_err();
        let status = err.status().unwrap();
        assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "invalid name: must be at most 64 characters"));
        let err = officer.create_key(&name, L::Personal, None, None).await.unwrap_err();
        assert_eq!(err.status().unwrap().code(), Code::InvalidArgument);
        assert!(err.status().unwrap().message().len() < 200);
    }
    let all = records(&server);
    let huge: Vec<_> = all.iter().filter(|r| r.rpc == "GetKey" || r.rpc == "CreateKey").collect();
    assert_eq!(huge.len(), 4);
    for r in &huge {
        assert!(r.key.starts_with("xxxx") && r.key.contains("more bytes)"), "{}", &r.key[r.key.len() - 40..]);
        assert!(r.key.len() < 600, "the record's key is bounded: {} bytes", r.key.len());
        assert!(r.encode().len() < 2048, "a record stays small: {} bytes", r.encode().len());
    }
    assert!(server.log().lines().all(|l| l.len() < 4096), "no log line carries the name whole");
    // The trail pages and exports for the auditor.
    let auditor = server.client("auditor").await;
    let page = auditor.list_audit_records(1, 1000).await.unwrap();
    assert_eq!(page.records.len() as u64, page.head_seq);
    let out = server.kmsctl("auditor", &["audit", "export", "--out", server.path("trail.jsonl").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_reach_no_handler_are_recorded() {
    use tonic::codegen::http::uri::PathAndQuery;
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    let mut grpc = tonic::client::Grpc::new(officer.channel());
    grpc.ready().await.unwrap();
    let err = grpc
        .unary(
            tonic::Request::new(pb::GetKeyRequest { name: "k".into() }),
            PathAndQuery::from_static("/kms.v1.KeyAdmin/NoSuchMethod"),
            tonic_prost::ProstCodec::<pb::GetKeyRequest, pb::Key>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    // A body that does not decode as the method's request (field 1 is a string; this sends a varint).
    grpc.ready().await.unwrap();
    let err = grpc
        .unary(
            tonic::Request::new(pb::KeyVersion { version: 7, ..Default::default() }),
            PathAndQuery::from_static("/kms.v1.KeyAdmin/GetKey"),
            tonic_prost::ProstCodec::<pb::KeyVersion, pb::Key>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    let all = records(&server);
    let unknown: Vec<_> = all.iter().filter(|r| r.rpc == "UnknownMethod").collect();
    assert_eq!(unknown.len(), 1);
    assert_eq!(
        (unknown[0].caller.as_str(), unknown[0].outcome, unknown[0].status_code, unknown[0].detail.starts_with("/kms.v1.KeyAdmin/NoSuchMethod")),
        (identity_of("officer").as_str(), kms_audit::Outcome::Refused, Code::Unimplemented as i32, true)
    );
    let undecoded: Vec<_> = all.iter().filter(|r| r.rpc == "UndecodedRequest").collect();
    assert_eq!(undecoded.len(), 1);
    assert!(undecoded[0].detail.starts_with("/kms.v1.KeyAdmin/GetKey: "), "{}", undecoded[0].detail);
    // A request that did reach its handler is recorded once, not twice.
    officer.get_key("nope").await.unwrap_err();
    assert_eq!(records(&server).iter().filter(|r| r.rpc == "GetKey").count(), 1);
    assert_eq!(records(&server).iter().filter(|r| r.rpc == "UndecodedRequest").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_items_rewraps_caller_changes_and_decisions_name_what_they_touched() {
    let server = TestServer::start(Settings::default());
    let officer = server.client("officer").await;
    officer.create_key("a", L::Personal, None, None).await.unwrap();
    officer.create_key("b", L::Personal, None, None).await.unwrap();
    let x = server.client("exchange").await;
    let c = ctx(&[("n", "1")]);
    let blob = x.generate_data_key("a", &c, Delivery::WrappedOnly).await.unwrap().wrapped;

    // ReWrap: source key and destination.
    x.re_wrap(&blob, &c, Some("b")).await.unwrap();
    let rewrap = records(&server).into_iter().rfind(|r| r.rpc == "ReWrap").unwrap();
    assert_eq!((rewrap.key.as_str(), rewrap.key_version, rewrap.detail.as_str()), ("a", 1, "to key b version 1"));

    // ReWrapBatch: one record per item, in its own request id, and one for the batch.
    let items = vec![
        pb::ReWrapRequest { blob: blob.clone(), encryption_context: c.clone().into_iter().collect(), destination_key: "b".into() },
        pb::ReWrapRequest { blob: vec![1, 2, 3], encryption_context: Default::default(), destination_key: String::new() },
        pb::ReWrapRequest { blob: blob.clone(), encryption_context: c.clone().into_iter().collect(), destination_key: String::new() },
    ];
    let answer = x.data_keys().re_wrap_batch(pb::ReWrapBatchRequest { items }).await.unwrap().into_inner();
    assert_eq!(answer.results.iter().map(|r| r.code).collect::<Vec<_>>(), [0, Code::InvalidArgument as i32, 0]);
    let all = records(&server);
    let batch = all.iter().rfind(|r| r.rpc == "ReWrapBatch").unwrap();
    let mut items: Vec<_> = all.iter().filter(|r| r.rpc == "ReWrapBatchItem").collect();
    items.sort_by(|p, q| p.request_id.cmp(&q.request_id));
    assert_eq!(
        items.iter().map(|r| (r.request_id.clone(), r.outcome, r.key.as_str(), r.detail.as_str())).collect::<Vec<_>>(),
        [
            (format!("{}#0", batch.request_id), kms_audit::Outcome::Ok, "a", "to key b version 1"),
            (format!("{}#1", batch.request_id), kms_audit::Outcome::Refused, "", items[1].detail.as_str()),
            (format!("{}#2", batch.request_id), kms_audit::Outcome::Ok, "a", "to key a version 1"),
        ]
    );
    assert!(items[1].detail.starts_with("invalid blob"), "{}", items[1].detail);
    assert!(items.iter().all(|r| r.caller == identity_of("exchange")));

    // Caller changes: whom and what.
    let reg = pb::Caller {
        identity: identity_of("newgw"),
        agency: "Agency".into(),
        name: "new gateway".into(),
        system_level: 3,
        clearance: L::Personal as i32,
        roles: vec!["exchange".into()],
        allowed_keys: vec!["a".into()],
        ..Default::default()
    };
    made(officer.register_caller(reg.clone()).await.unwrap());
    made(officer.update_caller(pb::Caller { system_level: 2, ..reg.clone() }).await.unwrap());
    let request = pending(officer.update_caller(pb::Caller { clearance: L::Secret as i32, system_level: 2, ..reg.clone() }).await.unwrap());
    let officer2 = server.client("officer2").await;
    officer2.reject(&request.id).await.unwrap();
    let all = records(&server);
    let ok = |rpc: &str| all.iter().filter(|r| r.rpc == rpc && r.outcome == kms_audit::Outcome::Ok).map(|r| r.detail.clone()).collect::<Vec<_>>();
    assert_eq!(
        ok("RegisterCaller"),
        ["caller urn:kms:caller:test-newgw: registered as roles exchange, clearance PERSONAL, system level 3, allowed keys [a]"]
    );
    assert_eq!(
        ok("UpdateCaller"),
        ["caller urn:kms:caller:test-newgw: system level 3 -> 2", "caller urn:kms:caller:test-newgw: clearance PERSONAL -> SECRET"]
    );
    assert_eq!(ok("Reject"), [format!("approval request {} rejected", request.id)]);
}
