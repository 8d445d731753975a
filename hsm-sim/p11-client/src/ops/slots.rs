//! Slots, tokens and mechanisms: `C_GetSlotList`, `C_GetSlotInfo`, `C_GetTokenInfo`,
//! `C_GetMechanismList`, `C_GetMechanismInfo`, `C_InitToken`.
//!
//! The two list functions answer their size query and the call after it with one request.

use hsm_sim_wire::{Blob, MechanismInfo, Reply, Request, SlotInfo, TokenInfo};

use super::expect;
use crate::module::{ListKey, Module, Rv, Space};

impl Module {
    pub(crate) fn slot_list(&self, token_present: bool, space: Space) -> Result<Vec<u64>, Rv> {
        self.list(ListKey::Slots { token_present }, space, Request::GetSlotList { token_present })
    }

    pub(crate) fn mechanism_list(&self, slot: u64, space: Space) -> Result<Vec<u64>, Rv> {
        self.list(ListKey::Mechanisms { slot }, space, Request::GetMechanismList { slot })
    }

    fn list(&self, key: ListKey, space: Space, req: Request) -> Result<Vec<u64>, Rv> {
        let list = match self.take_list(key) {
            Some(l) => l,
            None => expect(self.call(req)?, |r| match r {
                Reply::SlotList(l) | Reply::MechanismList(l) => Some(l),
                _ => None,
            })?,
        };
        if space.keeps(list.len()) {
            self.keep_list(key, list.clone());
        }
        Ok(list)
    }

    pub(crate) fn slot_info(&self, slot: u64) -> Result<SlotInfo, Rv> {
        expect(self.call(Request::GetSlotInfo { slot })?, |r| match r {
            Reply::SlotInfo(i) => Some(i),
            _ => None,
        })
    }

    pub(crate) fn token_info(&self, slot: u64) -> Result<TokenInfo, Rv> {
        expect(self.call(Request::GetTokenInfo { slot })?, |r| match r {
            Reply::TokenInfo(i) => Some(i),
            _ => None,
        })
    }

    pub(crate) fn mechanism_info(&self, slot: u64, mechanism: u64) -> Result<MechanismInfo, Rv> {
        expect(self.call(Request::GetMechanismInfo { slot, mechanism })?, |r| match r {
            Reply::MechanismInfo(i) => Some(i),
            _ => None,
        })
    }

    pub(crate) fn init_token(&self, slot: u64, so_pin: Option<Blob>, label: [u8; 32]) -> Result<(), Rv> {
        self.call(Request::InitToken { slot, so_pin, label }).map(drop)
    }
}
