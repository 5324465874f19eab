//! Requests to devices (logs, exec, restart) and their answers, matched by
//! correlation id. Transport-free: ingest publishes the outbox and delivers
//! what arrives on `cmd/res`; the API waits on the answers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use baton_protocol::{Command, CommandAction, CommandOutput, CommandResult, DeviceId};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// What the controller publishes to devices; ingest's MQTT loop sends it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// QoS 1 on `cmd`.
    Command(DeviceId, Command),
    /// QoS 1, retained, on `desired`: an encoded, signed document.
    Desired(DeviceId, Vec<u8>),
    /// QoS 1 on Mosquitto's dynamic-security control topic (`dynsec`).
    Dynsec(Vec<u8>),
    /// QoS 1, retained, on this topic (a presence said for a revoked device).
    Retained(String, Vec<u8>),
}

pub struct CommandRouter {
    next_id: AtomicU64,
    /// Every command is signed for its device (agents refuse unsigned ones).
    signer: baton_protocol::crypto::SigningKey,
    pending: Mutex<HashMap<u64, (DeviceId, UnboundedSender<CommandResult>)>>,
    outbox: UnboundedSender<Outgoing>,
}

/// An answer stream; dropping it forgets the request (and cancels a follow).
pub struct Pending<'a> {
    router: &'a CommandRouter,
    pub device: DeviceId,
    pub id: u64,
    pub answers: UnboundedReceiver<CommandResult>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.router.forget(self.id) {
            // Still open from our side: tell the device to stop (log follows).
            let cancel =
                self.router.signed(&self.device, self.router.fresh_id(), 0, CommandAction::Cancel { id: self.id });
            let _ = self.router.outbox.send(Outgoing::Command(self.device.clone(), cancel));
        }
    }
}

impl CommandRouter {
    pub fn new(outbox: UnboundedSender<Outgoing>, signer: baton_protocol::crypto::SigningKey) -> Self {
        // Ids start from the clock so a restarted controller does not reuse
        // ids that a device may still be answering (or remembers as used).
        let start = crate::controller::now_ms() << 16;
        Self { next_id: AtomicU64::new(start), signer, pending: Mutex::new(HashMap::new()), outbox }
    }

    fn signed(&self, device: &DeviceId, id: u64, deadline_ms: u64, action: CommandAction) -> Command {
        // The controller's clock, signed: a device judges the deadline by it
        // (its own clock may be days off), and learns that time from it.
        let issued_ms = crate::controller::now_ms();
        let cmd = Command {
            id,
            deadline_ms,
            action,
            key: Vec::new(),
            signature: Vec::new(),
            issued_ms,
            time_signature: Vec::new(),
        };
        self.signer.sign_command(device.as_str(), cmd)
    }

    fn fresh_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn forget(&self, id: u64) -> bool {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id).is_some()
    }

    /// Queues `action` for `device`; answers arrive on the returned stream.
    pub fn send(&self, device: DeviceId, action: CommandAction, deadline_ms: u64) -> Pending<'_> {
        let id = self.fresh_id();
        let (tx, answers) = unbounded_channel();
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id, (device.clone(), tx));
        let _ = self.outbox.send(Outgoing::Command(device.clone(), self.signed(&device, id, deadline_ms, action)));
        Pending { router: self, device, id, answers }
    }

    /// Sends `action` to `device` expecting no answer (a session's resizes
    /// and acknowledgements).
    pub fn notify(&self, device: &DeviceId, action: CommandAction, deadline_ms: u64) {
        let cmd = self.signed(device, self.fresh_id(), deadline_ms, action);
        let _ = self.outbox.send(Outgoing::Command(device.clone(), cmd));
    }

    /// Routes an answer; false when nobody waits for it or it came from the
    /// wrong device (a device cannot answer another device's request). The
    /// final answer (exit, done, error) ends the request: nothing is left for
    /// dropping it to cancel.
    pub fn deliver(&self, from: &DeviceId, result: CommandResult) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let last = matches!(result.body, CommandOutput::Exit(_) | CommandOutput::Done | CommandOutput::Error(_));
        let delivered = match pending.get(&result.id) {
            Some((device, tx)) if device == from => tx.send(result.clone()).is_ok(),
            _ => return false,
        };
        if last {
            pending.remove(&result.id);
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_routed_by_id_and_device_and_dropping_cancels() {
        let (tx, mut outbox) = unbounded_channel();
        let key = baton_protocol::crypto::SigningKey::from_seed(&[3; 32]);
        let trusted = [key.public()];
        let router = CommandRouter::new(tx, key);
        let a = DeviceId::new("a").unwrap();
        let b = DeviceId::new("b").unwrap();
        let mut p = router.send(a.clone(), CommandAction::Diagnostics, 0);
        let Outgoing::Command(to, cmd) = outbox.try_recv().unwrap() else { panic!("not a command") };
        assert_eq!((to, cmd.id), (a.clone(), p.id));
        assert_eq!(baton_protocol::crypto::verify_command(&trusted, "a", &cmd), Ok(()), "sent unsigned");
        let answer = |seq| CommandResult { id: cmd.id, seq, body: CommandOutput::Stdout(b"line".to_vec()) };
        assert!(!router.deliver(&b, answer(0)), "accepted an answer from the wrong device");
        assert!(router.deliver(&a, answer(1)));
        assert_eq!(p.answers.try_recv().unwrap().seq, 1);
        drop(p);
        let Outgoing::Command(_, cancel) = outbox.try_recv().unwrap() else { panic!("not a command") };
        assert_eq!(cancel.action, CommandAction::Cancel { id: cmd.id });
        assert_eq!(baton_protocol::crypto::verify_command(&trusted, "a", &cancel), Ok(()), "cancel sent unsigned");
        assert!(!router.deliver(&a, answer(2)), "delivered after the request was dropped");

        // A request that got its final answer is over: dropping it cancels nothing.
        let p = router.send(a.clone(), CommandAction::Diagnostics, 0);
        let _ = outbox.try_recv();
        assert!(router.deliver(&a, CommandResult { id: p.id, seq: 0, body: CommandOutput::Done }));
        drop(p);
        assert!(outbox.try_recv().is_err(), "a Cancel for a request that had ended");
    }
}
