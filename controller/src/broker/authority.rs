//! The controller as the broker's `Authority`: which CONNECTs it admits.

use baton_protocol::DeviceId;

use super::access::{Authority, Identity};
use super::wire::{Connect, BAD_CREDENTIALS, NOT_AUTHORIZED};
use crate::controller::{now_ms, Controller};

impl Authority for Controller {
    /// A device connects with client id = username = its id, and the password
    /// issued for it; a join session with username `join:<token id>` and the
    /// token's secret as password.
    fn authenticate(&self, c: &Connect) -> Result<Identity, (u8, &'static str)> {
        let (Some(user), Some(password)) = (&c.username, &c.password) else {
            return Err((NOT_AUTHORIZED, "no user name or password"));
        };
        if let Some(token) = baton_protocol::token::join_token_id(user) {
            let id = DeviceId::new(c.client_id.clone())
                .map_err(|_| (NOT_AUTHORIZED, "joining with a client id that is not a device id"))?;
            return match self.valid_token(token, password, now_ms()) {
                Ok(_) => Ok(Identity::Joining(id)),
                Err(why) => {
                    tracing::info!(device = %id, %why, "join refused");
                    Err((BAD_CREDENTIALS, "a join token that is unknown, spent, expired or revoked"))
                }
            };
        }
        if *user != c.client_id {
            return Err((NOT_AUTHORIZED, "a user name that is not its client id"));
        }
        let id = DeviceId::new(user.clone()).map_err(|_| (BAD_CREDENTIALS, "a user name that is not a device id"))?;
        if !self.password_matches(&id, password) {
            return Err((BAD_CREDENTIALS, "an unknown device or a wrong password"));
        }
        Ok(Identity::Device(id))
    }

    fn denied(&self, client: &str, what: &str) {
        self.record_denial(client, what, now_ms());
    }
}
