//! The wire format spoken between the hsm-sim PKCS#11 client module (`hsm-sim-p11`) and the network
//! HSM simulator (`hsm-sim serve`), and between `serve` and its per-connection backends.
//!
//! # Framing
//! A stream carries frames: a 4-byte big-endian body length (at most [`MAX_FRAME`]), then the body.
//! Every body starts with a header: a version byte ([`VERSION`]), a kind byte (1 request, 2 response),
//! a 4-byte request id chosen by the client, and the 2-byte [`Op`] code. A request continues with the
//! operation's arguments; a response with the 8-byte `CK_RV`, then — only when that is `CKR_OK` — the
//! operation's result. All integers are big-endian; byte strings and lists carry a 4-byte length or
//! count that is checked against a per-field limit before anything is allocated.
//!
//! # One round trip per operation
//! Requests are whole operations, not PKCS#11 calls: `Encrypt` carries the mechanism, key and data
//! that `C_EncryptInit` + `C_Encrypt` would; `FindObjects` returns every match at once. The client
//! module buffers the `Init` calls and answers size queries from the cached result.
//!
//! # Values
//! Attribute values travel typed ([`AttrValue`]): `CK_ULONG` attributes as 8-byte integers, arrays of
//! mechanisms as lists, nested templates (`CKA_WRAP_TEMPLATE`, `CKA_UNWRAP_TEMPLATE`,
//! `CKA_DERIVE_TEMPLATE`) as nested attribute lists, everything else as the caller's raw bytes.
//! Mechanism parameters travel typed too ([`MechParam`]). So neither side depends on the other's
//! `CK_ULONG` width, byte order or pointer layout.
//!
//! This crate owns the encoding and its limits. It must never do I/O beyond reading and writing whole
//! frames, never panic on malformed input (every decoder returns [`WireError`]), and never show a
//! byte string's contents in `Debug` output: every byte string is a [`Blob`], redacted and zeroized
//! on drop, because PINs, key values and plaintexts travel in them.
#![forbid(unsafe_code)]

mod attribute;
mod codec;
mod info;
mod mechanism;
mod message;
mod op;
mod rv;

pub use attribute::{template_token, value_kind, AttrResult, AttrValue, Attribute, ValueKind};
pub use codec::{read_frame, read_frame_up_to, write_frame, Blob, Decoder, Encoder, Frame, WireError};
pub use mechanism::{param_kind, MechParam, Mechanism, ParamKind};
pub use info::{MechanismInfo, SessionInfo, SlotInfo, TokenInfo};
pub use message::{Reply, Request, Response};
pub use op::{peek_header, FrameKind, Header, Op};
pub use rv::{rv_codes, rv_from_name, rv_name};

/// The protocol version in every frame header. A peer that sees another version closes the stream.
pub const VERSION: u8 = 1;

/// Largest frame body, in bytes.
pub const MAX_FRAME: usize = 16 << 20;
/// Most attributes in one template (nested templates count separately, with the same bound).
pub const MAX_TEMPLATE: usize = 256;
/// Most entries in a `CK_ULONG` list attribute (`CKA_ALLOWED_MECHANISMS`).
pub const MAX_ULONG_LIST: usize = 4096;
/// Largest single attribute value.
pub const MAX_ATTRIBUTE_VALUE: usize = 1 << 20;
/// Most handles in one `FindObjects` answer.
pub const MAX_HANDLES: usize = 1 << 20;
/// Most slots or mechanisms in a list answer.
pub const MAX_LIST: usize = 4096;
/// Longest PIN.
pub const MAX_PIN: usize = 256;
/// Largest small mechanism parameter (an IV, an EC point, KDF shared data, an OAEP label).
pub const MAX_PARAM: usize = 8192;
/// Largest GCM additional authenticated data.
pub const MAX_AAD: usize = 1 << 20;
/// Most bytes one `GenerateRandom` may ask for.
pub const MAX_RANDOM: usize = 1 << 20;
