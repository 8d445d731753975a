//! Runs one session-bound request against SoftHSM through `cryptoki`'s safe API: the whole
//! operation (`Init` and the completing call, or a search to its end) in one go.
//!
//! Decides, per request, whether it writes a token object (and so takes the token write lock
//! exclusively) or searches the token (shared). Must never pass SoftHSM a handle it did not hand
//! out, and never keep a plaintext outside a zeroized `Blob`.

use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::AuthPin;
use cryptoki_sys::*;
use hsm_sim_wire::{template_token, AttrResult, Blob, Reply, Request};
use secrecy::SecretBox;

use super::convert::{self, rv, Ckr, Template};
use super::objects::ObjectTable;
use super::token_lock::{Access, TokenLock};

/// What a request runs with: its session and the client's shared state.
pub(super) struct Context<'a> {
    pub(super) session: &'a Session,
    /// The session's number on the wire.
    pub(super) id: u64,
    pub(super) objects: &'a ObjectTable,
    pub(super) lock: &'a TokenLock,
}

impl Context<'_> {
    fn object(&self, wire: u64, invalid: Ckr) -> Result<ObjectHandle, Ckr> {
        self.objects.get(wire).ok_or(invalid)
    }

    /// Records a new object; a session object is remembered as this session's.
    fn made(&self, h: ObjectHandle, token: bool) -> Result<Reply, Ckr> {
        Ok(Reply::Object(self.objects.add(h, (!token).then_some(self.id))?))
    }

    /// Whether an existing object is a token object (asked of SoftHSM unless this client made it
    /// as a session object). Unknown counts as a token object: the lock is then taken needlessly,
    /// never skipped wrongly.
    fn is_token_object(&self, wire: u64, h: ObjectHandle) -> bool {
        if self.objects.is_own_session_object(wire) {
            return false;
        }
        match self.session.get_attributes(h, &[AttributeType::Token]) {
            Ok(attrs) => !attrs.contains(&Attribute::Token(false)),
            Err(_) => true,
        }
    }
}

fn writes(token: bool) -> Access {
    if token {
        Access::Write
    } else {
        Access::None
    }
}

fn data(v: Vec<u8>) -> Reply {
    Reply::Data(Blob::new(v))
}

/// A UTF-8 PIN for the `cryptoki` calls that take only those.
fn utf8_pin(pin: Option<Blob>) -> Result<AuthPin, Ckr> {
    let pin = pin.ok_or(CKR_ARGUMENTS_BAD)?;
    let s = std::str::from_utf8(&pin).map_err(|_| CKR_PIN_INVALID)?;
    Ok(AuthPin::from(s.to_owned()))
}

pub(super) fn run(c: &Context<'_>, req: Request) -> Result<Reply, Ckr> {
    let s = c.session;
    match req {
        Request::GetSessionInfo { .. } => Ok(Reply::SessionInfo(convert::session_info(&s.get_session_info().map_err(rv)?))),
        Request::Login { user_type, pin, .. } => {
            let user = convert::user_type(user_type)?;
            match pin {
                None => s.login(user, None),
                Some(p) => s.login_with_raw(user, &SecretBox::new(Box::new(p.to_vec()))),
            }
            .map_err(rv)?;
            Ok(Reply::None)
        }
        Request::Logout { .. } => s.logout().map(|()| Reply::None).map_err(rv),
        Request::InitPin { pin, .. } => {
            let pin = utf8_pin(pin)?;
            let _w = c.lock.hold(Access::Write);
            s.init_pin(&pin).map(|()| Reply::None).map_err(rv)
        }
        Request::SetPin { old_pin, new_pin, .. } => {
            let (old, new) = (utf8_pin(old_pin)?, utf8_pin(new_pin)?);
            let _w = c.lock.hold(Access::Write);
            s.set_pin(&old, &new).map(|()| Reply::None).map_err(rv)
        }
        Request::CreateObject { template, .. } => {
            let token = template_token(&template) == Some(true);
            let t = Template::from_wire(&template)?;
            let _w = c.lock.hold(writes(token));
            let h = s.create_object(t.attributes()).map_err(rv)?;
            c.made(h, token)
        }
        Request::CopyObject { object, template, .. } => {
            let src = c.object(object, CKR_OBJECT_HANDLE_INVALID)?;
            let token = template_token(&template).unwrap_or_else(|| c.is_token_object(object, src));
            let t = Template::from_wire(&template)?;
            let _w = c.lock.hold(writes(token));
            let h = s.copy_object(src, t.attributes()).map_err(rv)?;
            c.made(h, token)
        }
        Request::DestroyObject { object, .. } => {
            let h = c.object(object, CKR_OBJECT_HANDLE_INVALID)?;
            let token = c.is_token_object(object, h);
            let _w = c.lock.hold(writes(token));
            s.destroy_object(h).map_err(rv)?;
            c.objects.remove(object);
            Ok(Reply::None)
        }
        Request::GetAttributeValue { object, types, .. } => {
            let h = c.object(object, CKR_OBJECT_HANDLE_INVALID)?;
            attribute_values(s, h, &types).map(Reply::Attributes)
        }
        Request::SetAttributeValue { object, template, .. } => {
            let h = c.object(object, CKR_OBJECT_HANDLE_INVALID)?;
            let token = c.is_token_object(object, h);
            let t = Template::from_wire(&template)?;
            let _w = c.lock.hold(writes(token));
            s.update_attributes(h, t.attributes()).map(|()| Reply::None).map_err(rv)
        }
        Request::FindObjects { template, .. } => {
            let t = Template::from_wire(&template)?;
            let found = {
                let _r = c.lock.hold(Access::Scan);
                s.find_objects(t.attributes()).map_err(rv)?
            };
            if found.len() > hsm_sim_wire::MAX_HANDLES {
                return Err(CKR_DEVICE_MEMORY);
            }
            let wires = found.into_iter().map(|h| c.objects.add(h, None)).collect::<Result<Vec<_>, _>>()?;
            Ok(Reply::Objects(wires))
        }
        Request::Encrypt { mut mechanism, key, data: input, .. } => {
            let key = c.object(key, CKR_OBJECT_HANDLE_INVALID)?;
            let m = convert::mechanism(&mut mechanism)?;
            s.encrypt(&m, key, &input).map(data).map_err(rv)
        }
        Request::Decrypt { mut mechanism, key, data: input, .. } => {
            let key = c.object(key, CKR_OBJECT_HANDLE_INVALID)?;
            let m = convert::mechanism(&mut mechanism)?;
            s.decrypt(&m, key, &input).map(data).map_err(rv)
        }
        Request::Sign { mut mechanism, key, data: input, .. } => {
            let key = c.object(key, CKR_OBJECT_HANDLE_INVALID)?;
            let m = convert::mechanism(&mut mechanism)?;
            s.sign(&m, key, &input).map(data).map_err(rv)
        }
        Request::Verify { mut mechanism, key, data: input, signature, .. } => {
            let key = c.object(key, CKR_OBJECT_HANDLE_INVALID)?;
            let m = convert::mechanism(&mut mechanism)?;
            s.verify(&m, key, &input, &signature).map(|()| Reply::None).map_err(rv)
        }
        Request::Digest { mut mechanism, data: input, .. } => {
            let m = convert::mechanism(&mut mechanism)?;
            s.digest(&m, &input).map(data).map_err(rv)
        }
        Request::GenerateKey { mut mechanism, template, .. } => {
            let token = template_token(&template) == Some(true);
            let m = convert::mechanism(&mut mechanism)?;
            let t = Template::from_wire(&template)?;
            let _w = c.lock.hold(writes(token));
            let h = s.generate_key(&m, t.attributes()).map_err(rv)?;
            c.made(h, token)
        }
        Request::GenerateKeyPair { mut mechanism, public_template, private_template, .. } => {
            let public_token = template_token(&public_template) == Some(true);
            let private_token = template_token(&private_template) == Some(true);
            let m = convert::mechanism(&mut mechanism)?;
            let (pt, kt) = (Template::from_wire(&public_template)?, Template::from_wire(&private_template)?);
            let _w = c.lock.hold(writes(public_token || private_token));
            let (public, private) = s.generate_key_pair(&m, pt.attributes(), kt.attributes()).map_err(rv)?;
            let public = c.objects.add(public, (!public_token).then_some(c.id))?;
            let private = c.objects.add(private, (!private_token).then_some(c.id))?;
            Ok(Reply::KeyPair { public, private })
        }
        Request::WrapKey { mut mechanism, wrapping_key, key, .. } => {
            let wrapping = c.object(wrapping_key, CKR_WRAPPING_KEY_HANDLE_INVALID)?;
            let key = c.object(key, CKR_KEY_HANDLE_INVALID)?;
            let m = convert::mechanism(&mut mechanism)?;
            s.wrap_key(&m, wrapping, key).map(data).map_err(rv)
        }
        Request::UnwrapKey { mut mechanism, unwrapping_key, wrapped, template, .. } => {
            let token = template_token(&template) == Some(true);
            let unwrapping = c.object(unwrapping_key, CKR_UNWRAPPING_KEY_HANDLE_INVALID)?;
            let m = convert::mechanism(&mut mechanism)?;
            let t = Template::from_wire(&template)?;
            let _w = c.lock.hold(writes(token));
            let h = s.unwrap_key(&m, unwrapping, &wrapped, t.attributes()).map_err(rv)?;
            c.made(h, token)
        }
        Request::DeriveKey { mut mechanism, base_key, template, .. } => {
            let token = template_token(&template) == Some(true);
            let base = c.object(base_key, CKR_OBJECT_HANDLE_INVALID)?;
            let m = convert::mechanism(&mut mechanism)?;
            let t = Template::from_wire(&template)?;
            let _w = c.lock.hold(writes(token));
            let h = s.derive_key(&m, base, t.attributes()).map_err(rv)?;
            c.made(h, token)
        }
        Request::SeedRandom { seed, .. } => s.seed_random(&seed).map(|()| Reply::None).map_err(rv),
        Request::GenerateRandom { len, .. } => s.generate_random_vec(len).map(data).map_err(rv),
        // Closing is the worker's job; the rest need no session and never reach a worker.
        _ => Err(CKR_GENERAL_ERROR),
    }
}

/// Each attribute's answer, as SoftHSM gives it: the value, or sensitive, or no such attribute.
/// An attribute type `cryptoki` cannot read back (nested templates, types it does not know) is
/// answered as no such attribute.
fn attribute_values(s: &Session, h: ObjectHandle, types: &[u64]) -> Result<Vec<AttrResult>, Ckr> {
    let mut results = vec![AttrResult::TypeInvalid; types.len()];
    let mut readable = Vec::new();
    for (i, t) in types.iter().enumerate() {
        let Ok(typed) = AttributeType::try_from(*t) else { continue };
        match s.get_attribute_info(h, &[typed]).map_err(rv)?.first() {
            Some(AttributeInfo::Available(_)) => readable.push((i, typed)),
            Some(AttributeInfo::Sensitive) => results[i] = AttrResult::Sensitive,
            Some(AttributeInfo::Unavailable) => results[i] = AttrResult::Unavailable,
            Some(AttributeInfo::TypeInvalid) | None => {}
        }
    }
    if readable.is_empty() {
        return Ok(results);
    }
    let asked: Vec<AttributeType> = readable.iter().map(|(_, t)| *t).collect();
    let values = match s.get_attributes(h, &asked) {
        Ok(v) => v,
        // One attribute `cryptoki` cannot convert fails the batch: read them one by one.
        Err(_) => asked.iter().filter_map(|t| s.get_attributes(h, &[*t]).ok()).flatten().collect(),
    };
    for (i, typed) in readable {
        if let Some(v) = values.iter().find(|a| a.attribute_type() == typed).and_then(convert::attribute_value) {
            results[i] = AttrResult::Value(v);
        }
    }
    Ok(results)
}
