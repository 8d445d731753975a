//! The information structures of the protocol: `CK_SLOT_INFO`, `CK_TOKEN_INFO`,
//! `CK_MECHANISM_INFO`, `CK_SESSION_INFO`, with fixed-width text as PKCS#11 holds it.
//!
//! Owns only their shape; encoding is in [`crate::message`].

/// `CK_SLOT_INFO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub description: [u8; 64],
    pub manufacturer: [u8; 32],
    pub flags: u64,
    pub hardware_version: [u8; 2],
    pub firmware_version: [u8; 2],
}

/// `CK_TOKEN_INFO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub label: [u8; 32],
    pub manufacturer: [u8; 32],
    pub model: [u8; 16],
    pub serial: [u8; 16],
    pub flags: u64,
    /// `ulMaxSessionCount`, `ulSessionCount`, `ulMaxRwSessionCount`, `ulRwSessionCount`,
    /// `ulMaxPinLen`, `ulMinPinLen`, `ulTotalPublicMemory`, `ulFreePublicMemory`,
    /// `ulTotalPrivateMemory`, `ulFreePrivateMemory`, in that order; `u64::MAX` is
    /// `CK_UNAVAILABLE_INFORMATION` and `0` for the maxima `CK_EFFECTIVELY_INFINITE`.
    pub counts: [u64; 10],
    pub hardware_version: [u8; 2],
    pub firmware_version: [u8; 2],
    pub utc_time: [u8; 16],
}

/// `CK_MECHANISM_INFO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MechanismInfo {
    pub min_key_size: u64,
    pub max_key_size: u64,
    pub flags: u64,
}

/// `CK_SESSION_INFO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub slot: u64,
    pub state: u64,
    pub flags: u64,
    pub device_error: u64,
}

