//! The module's C ABI called as a C application calls it (through `C_GetFunctionList`), against a
//! real `hsm-sim serve`: initialisation rules, the size-query convention, per-attribute answers of
//! `C_GetAttributeValue`, searches in batches, and one round trip per operation.
//!
//! This file holds `unsafe` because calling a C ABI takes it; every call passes live locals of the
//! sizes it states. The module's state is process-wide: the tests of this file take a lock and
//! finalise at the end (cargo-nextest runs each in its own process anyway). Build the simulator
//! first: `cargo build -p hsm-sim -p hsm-sim-p11`.

use std::ffi::c_void;
use std::ptr;
use std::sync::Mutex;

use cryptoki_sys::*;
use hsm_sim::{NetHsm, SimToken};
use secrecy::ExposeSecret;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn functions() -> &'static CK_FUNCTION_LIST {
    let mut list: *mut CK_FUNCTION_LIST = ptr::null_mut();
    // SAFETY: `list` is a live local pointer the call writes once.
    assert_eq!(unsafe { hsm_sim_p11::C_GetFunctionList(&mut list) }, CKR_OK);
    // SAFETY: the module returns a pointer to its static, immutable function list.
    unsafe { &*list }
}

/// Calls a function of the list. Every use passes pointers to live locals of the stated sizes.
macro_rules! p11 {
    ($f:ident($($arg:expr),* $(,)?)) => {{
        let f = functions().$f.expect(stringify!($f));
        // SAFETY: see the macro's doc: arguments are live locals of the sizes PKCS#11 requires.
        unsafe { f($($arg),*) }
    }};
}

struct Sim {
    hsm: NetHsm,
    token: SimToken,
    _dir: tempfile::TempDir,
}

fn sim() -> Sim {
    let dir = tempfile::Builder::new().prefix("hsm-cabi-").tempdir_in("/dev/shm").expect("tempdir");
    let token = SimToken::create(dir.path(), "cabi").expect("token");
    let hsm = NetHsm::start(&token).expect("hsm-sim serve");
    std::env::set_var(hsm_sim::net::ENDPOINT_VAR, hsm.unix_endpoint());
    Sim { hsm, token, _dir: dir }
}

fn initialise() {
    assert_eq!(p11!(C_Initialize(ptr::null_mut())), CKR_OK);
}

fn finalise() {
    assert_eq!(p11!(C_Finalize(ptr::null_mut())), CKR_OK);
}

/// The initialised token's slot.
fn slot() -> CK_SLOT_ID {
    let mut slots = [0 as CK_SLOT_ID; 8];
    let mut n: CK_ULONG = 8;
    assert_eq!(p11!(C_GetSlotList(CK_TRUE, slots.as_mut_ptr(), &mut n)), CKR_OK);
    for s in &slots[..n as usize] {
        // SAFETY: an all-zero CK_TOKEN_INFO is a valid value of plain integers and arrays.
        let mut info: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
        assert_eq!(p11!(C_GetTokenInfo(*s, &mut info)), CKR_OK);
        if info.flags & CKF_TOKEN_INITIALIZED != 0 {
            return *s;
        }
    }
    panic!("no initialised token");
}

fn logged_in_session(sim: &Sim) -> CK_SESSION_HANDLE {
    let mut h: CK_SESSION_HANDLE = 0;
    assert_eq!(p11!(C_OpenSession(slot(), CKF_SERIAL_SESSION | CKF_RW_SESSION, ptr::null_mut(), None, &mut h)), CKR_OK);
    let pin = sim.token.user_pin().expose_secret().as_bytes().to_vec();
    assert_eq!(p11!(C_Login(h, CKU_USER, pin.as_ptr() as *mut u8, pin.len() as CK_ULONG)), CKR_OK);
    h
}

fn attr<T>(t: CK_ATTRIBUTE_TYPE, v: &T) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE { type_: t, pValue: v as *const T as *mut c_void, ulValueLen: std::mem::size_of::<T>() as CK_ULONG }
}

/// An attribute the module writes into.
fn out_attr<T>(t: CK_ATTRIBUTE_TYPE, v: &mut T) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE { type_: t, pValue: v as *mut T as *mut c_void, ulValueLen: std::mem::size_of::<T>() as CK_ULONG }
}

fn bytes_attr(t: CK_ATTRIBUTE_TYPE, v: &[u8]) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE { type_: t, pValue: v.as_ptr() as *mut c_void, ulValueLen: v.len() as CK_ULONG }
}

/// A sensitive AES-256 session key that can encrypt, labelled `label`.
fn aes_key(h: CK_SESSION_HANDLE, label: &[u8], token: bool) -> CK_OBJECT_HANDLE {
    let (class, key_type, len) = (CKO_SECRET_KEY, CKK_AES, 32 as CK_ULONG);
    let (yes, no, tok) = (CK_TRUE, CK_FALSE, if token { CK_TRUE } else { CK_FALSE });
    let mut t = [
        attr(CKA_CLASS, &class),
        attr(CKA_KEY_TYPE, &key_type),
        attr(CKA_VALUE_LEN, &len),
        attr(CKA_TOKEN, &tok),
        attr(CKA_SENSITIVE, &yes),
        attr(CKA_EXTRACTABLE, &no),
        attr(CKA_ENCRYPT, &yes),
        bytes_attr(CKA_LABEL, label),
    ];
    let mut m = CK_MECHANISM { mechanism: CKM_AES_KEY_GEN, pParameter: ptr::null_mut(), ulParameterLen: 0 };
    let mut key: CK_OBJECT_HANDLE = 0;
    assert_eq!(p11!(C_GenerateKey(h, &mut m, t.as_mut_ptr(), t.len() as CK_ULONG, &mut key)), CKR_OK);
    key
}

#[test]
fn initialisation_follows_the_rules() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sim = sim();
    let mut n: CK_ULONG = 0;
    assert_eq!(p11!(C_GetSlotList(CK_TRUE, ptr::null_mut(), &mut n)), CKR_CRYPTOKI_NOT_INITIALIZED);
    assert_eq!(p11!(C_Finalize(ptr::null_mut())), CKR_CRYPTOKI_NOT_INITIALIZED);

    // Caller-supplied mutexes without OS locking: the module cannot use them.
    unsafe extern "C" fn create(_: *mut *mut c_void) -> CK_RV {
        CKR_OK
    }
    unsafe extern "C" fn other(_: *mut c_void) -> CK_RV {
        CKR_OK
    }
    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: Some(create),
        DestroyMutex: Some(other),
        LockMutex: Some(other),
        UnlockMutex: Some(other),
        flags: 0,
        pReserved: ptr::null_mut(),
    };
    assert_eq!(p11!(C_Initialize(&mut args as *mut _ as *mut c_void)), CKR_CANT_LOCK);
    args.flags = CKF_OS_LOCKING_OK | CKF_LIBRARY_CANT_CREATE_OS_THREADS;
    assert_eq!(p11!(C_Initialize(&mut args as *mut _ as *mut c_void)), CKR_NEED_TO_CREATE_THREADS);
    args.flags = CKF_OS_LOCKING_OK;
    args.pReserved = &mut n as *mut _ as *mut c_void;
    assert_eq!(p11!(C_Initialize(&mut args as *mut _ as *mut c_void)), CKR_ARGUMENTS_BAD);
    args.pReserved = ptr::null_mut();
    assert_eq!(p11!(C_Initialize(&mut args as *mut _ as *mut c_void)), CKR_OK);
    assert_eq!(p11!(C_Initialize(ptr::null_mut())), CKR_CRYPTOKI_ALREADY_INITIALIZED);
    assert_eq!(p11!(C_Finalize(&mut n as *mut _ as *mut c_void)), CKR_ARGUMENTS_BAD);
    finalise();

    std::env::remove_var(hsm_sim::net::ENDPOINT_VAR);
    assert_eq!(p11!(C_Initialize(ptr::null_mut())), CKR_FUNCTION_FAILED, "no endpoint configured");
    std::env::set_var(hsm_sim::net::ENDPOINT_VAR, sim.hsm.unix_endpoint());

    initialise();
    // SAFETY: an all-zero CK_INFO is a valid value.
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    assert_eq!(p11!(C_GetInfo(&mut info)), CKR_OK);
    assert_eq!(&info.manufacturerID[..7], b"hsm-sim");
    assert_eq!((info.cryptokiVersion.major, info.cryptokiVersion.minor), (2, 40));
    assert_eq!(p11!(C_EncryptUpdate(1, ptr::null_mut(), 0, ptr::null_mut(), &mut n)), CKR_FUNCTION_NOT_SUPPORTED);
    assert_eq!(p11!(C_GetFunctionStatus(1)), CKR_FUNCTION_NOT_PARALLEL);
    finalise();
}

#[test]
fn outputs_follow_the_size_query_convention_with_one_round_trip() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sim = sim();
    initialise();
    let calls = || sim.hsm.status().expect("status").calls;

    let before = calls();
    let mut n: CK_ULONG = 0;
    assert_eq!(p11!(C_GetSlotList(CK_FALSE, ptr::null_mut(), &mut n)), CKR_OK);
    assert_eq!(n, 2, "SoftHSM offers its token and one free slot");
    let mut slots = [0 as CK_SLOT_ID; 2];
    let mut short: CK_ULONG = 1;
    assert_eq!(p11!(C_GetSlotList(CK_FALSE, slots.as_mut_ptr(), &mut short)), CKR_BUFFER_TOO_SMALL);
    assert_eq!(short, 2);
    assert_eq!(p11!(C_GetSlotList(CK_FALSE, slots.as_mut_ptr(), &mut n)), CKR_OK);
    assert_eq!(calls() - before, 1, "a size query and its answer are one round trip");

    let h = logged_in_session(&sim);
    let key = aes_key(h, b"ecb", false);
    let mut ecb = CK_MECHANISM { mechanism: CKM_AES_ECB, pParameter: ptr::null_mut(), ulParameterLen: 0 };
    let mut data = [0x42u8; 32];
    let before = calls();
    assert_eq!(p11!(C_EncryptInit(h, &mut ecb, key)), CKR_OK);
    assert_eq!(p11!(C_EncryptInit(h, &mut ecb, key)), CKR_OPERATION_ACTIVE);
    let mut len: CK_ULONG = 0;
    assert_eq!(p11!(C_Encrypt(h, data.as_mut_ptr(), 32, ptr::null_mut(), &mut len)), CKR_OK);
    assert_eq!(len, 32);
    let mut out = [0u8; 32];
    let mut small: CK_ULONG = 16;
    assert_eq!(p11!(C_Encrypt(h, data.as_mut_ptr(), 32, out.as_mut_ptr(), &mut small)), CKR_BUFFER_TOO_SMALL);
    assert_eq!((small, out), (32, [0; 32]), "the length, and nothing written");
    assert_eq!(p11!(C_Encrypt(h, data.as_mut_ptr(), 32, out.as_mut_ptr(), &mut len)), CKR_OK);
    assert_eq!(calls() - before, 1, "EncryptInit, the size query, the short buffer and the answer: one round trip");
    assert_ne!(out, data);
    assert_eq!(&out[..16], &out[16..], "ECB: equal blocks encrypt equally");
    assert_eq!(p11!(C_Encrypt(h, data.as_mut_ptr(), 32, out.as_mut_ptr(), &mut len)), CKR_OPERATION_NOT_INITIALIZED);

    // A failure ends the operation, as in PKCS#11 (ECB needs whole blocks).
    assert_eq!(p11!(C_EncryptInit(h, &mut ecb, key)), CKR_OK);
    assert_eq!(p11!(C_Encrypt(h, data.as_mut_ptr(), 5, ptr::null_mut(), &mut len)), CKR_DATA_LEN_RANGE);
    assert_eq!(p11!(C_Encrypt(h, data.as_mut_ptr(), 32, ptr::null_mut(), &mut len)), CKR_OPERATION_NOT_INITIALIZED);

    // Handles the module never gave out are refused locally.
    assert_eq!(p11!(C_EncryptInit(h, &mut ecb, 12345)), CKR_OBJECT_HANDLE_INVALID);
    assert_eq!(p11!(C_CloseSession(h ^ (1 << 40))), CKR_SESSION_HANDLE_INVALID);
    assert_eq!(p11!(C_CloseSession(h)), CKR_OK);
    assert_eq!(p11!(C_CloseSession(h)), CKR_SESSION_HANDLE_INVALID);
    finalise();
}

#[test]
fn get_attribute_value_answers_each_attribute_by_the_rules() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sim = sim();
    initialise();
    let h = logged_in_session(&sim);
    let key = aes_key(h, b"kek-label", true);

    let mut value_len: CK_ULONG = 0;
    let mut t = [
        CK_ATTRIBUTE { type_: CKA_VALUE, pValue: ptr::null_mut(), ulValueLen: 0 },
        CK_ATTRIBUTE { type_: CKA_LABEL, pValue: ptr::null_mut(), ulValueLen: 0 },
        out_attr(CKA_VALUE_LEN, &mut value_len),
        CK_ATTRIBUTE { type_: CKA_MODULUS, pValue: ptr::null_mut(), ulValueLen: 0 },
    ];
    let before = sim.hsm.status().expect("status").calls;
    assert_eq!(p11!(C_GetAttributeValue(h, key, t.as_mut_ptr(), 4)), CKR_ATTRIBUTE_SENSITIVE);
    assert_eq!(t[0].ulValueLen, CK_UNAVAILABLE_INFORMATION, "a sensitive value");
    assert_eq!(t[1].ulValueLen, 9, "a length for a NULL buffer");
    assert_eq!((t[2].ulValueLen, value_len), (8, 32));
    assert_eq!(t[3].ulValueLen, CK_UNAVAILABLE_INFORMATION, "an AES key has no modulus");

    let mut label = [0u8; 9];
    let mut t2 = [bytes_attr(CKA_LABEL, &label), CK_ATTRIBUTE { type_: CKA_MODULUS, pValue: ptr::null_mut(), ulValueLen: 0 }];
    t2[0].pValue = label.as_mut_ptr() as *mut c_void;
    assert_eq!(p11!(C_GetAttributeValue(h, key, t2.as_mut_ptr(), 2)), CKR_ATTRIBUTE_TYPE_INVALID);
    assert_eq!(&label, b"kek-label");
    assert_eq!(sim.hsm.status().expect("status").calls - before, 1, "the second call was answered from the first");

    let mut tiny = [0u8; 2];
    let mut t3 = [bytes_attr(CKA_LABEL, &tiny)];
    t3[0].pValue = tiny.as_mut_ptr() as *mut c_void;
    assert_eq!(p11!(C_GetAttributeValue(h, key, t3.as_mut_ptr(), 1)), CKR_BUFFER_TOO_SMALL);
    assert_eq!(t3[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);

    // A search hands out its answers in batches; the search is one round trip.
    for i in 0..4u8 {
        aes_key(h, &[b'k', i], false);
    }
    let class = CKO_SECRET_KEY;
    let mut find = [attr(CKA_CLASS, &class)];
    let before = sim.hsm.status().expect("status").calls;
    assert_eq!(p11!(C_FindObjectsInit(h, find.as_mut_ptr(), 1)), CKR_OK);
    assert_eq!(p11!(C_FindObjectsInit(h, find.as_mut_ptr(), 1)), CKR_OPERATION_ACTIVE);
    let mut got = [0 as CK_OBJECT_HANDLE; 2];
    let mut sizes = Vec::new();
    loop {
        let mut n: CK_ULONG = 0;
        assert_eq!(p11!(C_FindObjects(h, got.as_mut_ptr(), 2, &mut n)), CKR_OK);
        sizes.push(n);
        if n == 0 {
            break;
        }
    }
    assert_eq!(sizes, [2, 2, 1, 0]);
    assert_eq!(p11!(C_FindObjectsFinal(h)), CKR_OK);
    assert_eq!(p11!(C_FindObjectsFinal(h)), CKR_OPERATION_NOT_INITIALIZED);
    assert_eq!(sim.hsm.status().expect("status").calls - before, 1);
    finalise();
}

#[test]
fn gcm_parameters_in_the_2_40_layout_work_like_the_3_0_layout() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sim = sim();
    initialise();
    let h = logged_in_session(&sim);
    let key = aes_key(h, b"gcm", false);
    let (mut iv, mut aad, mut data) = ([9u8; 12], *b"aad", *b"sixteen byte msg");
    let v30 = CK_GCM_PARAMS { pIv: iv.as_mut_ptr(), ulIvLen: 12, ulIvBits: 96, pAAD: aad.as_mut_ptr(), ulAADLen: 3, ulTagBits: 128 };
    #[repr(C)]
    struct GcmParams240 {
        p_iv: *mut u8,
        iv_len: CK_ULONG,
        p_aad: *mut u8,
        aad_len: CK_ULONG,
        tag_bits: CK_ULONG,
    }
    let v240 = GcmParams240 { p_iv: iv.as_mut_ptr(), iv_len: 12, p_aad: aad.as_mut_ptr(), aad_len: 3, tag_bits: 128 };
    let mut outs = Vec::new();
    for (p, len) in [
        (&v30 as *const _ as *mut c_void, std::mem::size_of::<CK_GCM_PARAMS>()),
        (&v240 as *const _ as *mut c_void, std::mem::size_of::<GcmParams240>()),
    ] {
        let mut m = CK_MECHANISM { mechanism: CKM_AES_GCM, pParameter: p, ulParameterLen: len as CK_ULONG };
        assert_eq!(p11!(C_EncryptInit(h, &mut m, key)), CKR_OK);
        let mut out = [0u8; 32];
        let mut out_len: CK_ULONG = 32;
        assert_eq!(p11!(C_Encrypt(h, data.as_mut_ptr(), 16, out.as_mut_ptr(), &mut out_len)), CKR_OK);
        assert_eq!(out_len, 32);
        outs.push(out);
    }
    assert_eq!(outs[0], outs[1]);
    let mut m = CK_MECHANISM { mechanism: CKM_AES_GCM, pParameter: &v30 as *const _ as *mut c_void, ulParameterLen: 7 };
    assert_eq!(p11!(C_EncryptInit(h, &mut m, key)), CKR_MECHANISM_PARAM_INVALID);
    finalise();
}
