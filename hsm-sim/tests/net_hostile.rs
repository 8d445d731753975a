//! Hostile frames: `hsm-sim serve` closes the connection that sent one, never panics, and keeps
//! serving everyone else.
//!
//! Run with cargo-nextest (one process per test); see `common` for why.

#![forbid(unsafe_code)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use hsm_sim_wire::{Blob, Request};

use common::Net;

/// Sends `bytes` on a fresh connection and reports whether the server closed it (end of stream)
/// rather than answering.
fn closed_after(net: &Net, bytes: &[u8]) -> bool {
    let mut s = UnixStream::connect(net.hsm.socket_path()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s.write_all(bytes).expect("write");
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0) | Err(_))
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
fn malformed_frames_close_their_connection_and_nothing_else() {
    let net = Net::start();
    let s = net.user_session();

    let good = Request::GetSlotList { token_present: true }.encode(1);
    let mut wrong_version = good.body().to_vec();
    wrong_version[0] = 99;
    assert!(closed_after(&net, &framed(&wrong_version)), "another protocol version");

    assert!(closed_after(&net, &[0xff, 0xff, 0xff, 0xff, 0, 0]), "a length over the limit, never allocated");

    let mut bad_op = good.body().to_vec();
    bad_op[6] = 0xff;
    assert!(closed_after(&net, &framed(&bad_op)), "an unknown operation");

    // A well-formed header with a body that lies about its lengths: the backend refuses it.
    let req = Request::SeedRandom { session: 1, seed: Blob::from_slice(b"0123456789") }.encode(2);
    let mut lying = req.body().to_vec();
    let n = lying.len();
    lying[n - 14..n - 10].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(closed_after(&net, &framed(&lying)), "a byte string longer than its frame");

    let mut trailing = good.body().to_vec();
    trailing.push(0);
    assert!(closed_after(&net, &framed(&trailing)), "bytes after the last field");

    // A client that sends a response instead of a request.
    let response = hsm_sim_wire::Response::error(0).encode(3, hsm_sim_wire::Op::GetSlotList);
    assert!(closed_after(&net, response.as_bytes()), "a response from a client");

    // The well-behaved client was never disturbed.
    assert_eq!(s.generate_random_vec(16).expect("still served").len(), 16);
    // The server counts a connection as gone once its thread has finished, which may be just
    // after the client saw it closed: wait (boundedly) for the count to settle.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut connections = net.hsm.status().expect("status").connections;
    while connections != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        connections = net.hsm.status().expect("status").connections;
    }
    assert_eq!(connections, 1, "every hostile connection is closed");
}

#[test]
fn a_well_formed_request_on_a_raw_connection_is_answered() {
    let net = Net::start();
    let mut s = UnixStream::connect(net.hsm.socket_path()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let req = Request::GetSlotList { token_present: true }.encode(77);
    s.write_all(req.as_bytes()).expect("write");
    let body = hsm_sim_wire::read_frame(&mut s).expect("read").expect("an answer");
    let (header, response) = hsm_sim_wire::Response::decode(&body).expect("decode");
    assert_eq!((header.id, response.rv), (77, 0));
    // The token and the free slot SoftHSM always offers.
    assert!(matches!(response.reply, hsm_sim_wire::Reply::SlotList(ref l) if l.len() == 2), "{response:?}");
}
