//! Per-object operation guard: at most one operation in flight per volume (or name) in this
//! process. A second caller is told ABORTED at once instead of queueing, which is what the CSI
//! spec asks for and what the sidecars retry on. There is deliberately no driver-wide lock.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

#[derive(Clone, Default)]
pub struct OpGuards {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held for the duration of one operation; dropping it frees the key.
pub struct OpGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl OpGuards {
    /// Claims `key`, or fails with ABORTED when another operation holds it.
    pub fn acquire(&self, key: &str) -> Result<OpGuard> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if !busy.insert(key.to_string()) {
            return Err(Error::Aborted(format!(
                "an operation on {key} is already in progress"
            )));
        }
        Ok(OpGuard {
            busy: self.busy.clone(),
            key: key.to_string(),
        })
    }

    /// Number of operations in flight.
    pub fn in_flight(&self) -> usize {
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_aborted_until_the_first_is_dropped() {
        let guards = OpGuards::default();
        let first = guards.acquire("vol-a").unwrap();
        assert!(matches!(guards.acquire("vol-a"), Err(Error::Aborted(_))));
        let other = guards.acquire("vol-b").unwrap();
        assert_eq!(guards.in_flight(), 2);
        drop(first);
        let again = guards.acquire("vol-a").unwrap();
        drop((again, other));
        assert_eq!(guards.in_flight(), 0);
    }
}
