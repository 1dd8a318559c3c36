//! In-memory storage: nothing survives the process, but a "restart" within the process (a new
//! server on the same `MemoryStorage`) recovers everything, like a disk would.

use std::sync::{Arc, Mutex, MutexGuard};

use super::{Durable, Recovered, Snapshot, Storage};
use crate::error::{Error, Result};
use crate::event::LogEntry;

/// Storage in memory. Clones share the same contents.
#[derive(Debug, Clone, Default)]
pub struct MemoryStorage {
    inner: Arc<Mutex<Recovered>>,
}

impl MemoryStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Recovered> {
        // A panic while holding this lock cannot leave the log half-written (every update is a
        // single push or replace), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl Storage for MemoryStorage {
    async fn recover(&self) -> Result<Recovered> {
        Ok(self.lock().clone())
    }

    fn append(&self, entries: Vec<LogEntry>) -> Durable {
        let mut log = self.lock();
        let mut next = log.last_index().next();
        for entry in &entries {
            if entry.index != next {
                let error = Error::Corrupt(format!(
                    "append of index {} where {} was expected",
                    entry.index, next
                ));
                return Box::pin(std::future::ready(Err(error)));
            }
            next = next.next();
        }
        log.entries.extend(entries);
        Box::pin(std::future::ready(Ok(())))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let mut log = self.lock();
        log.entries.retain(|e| e.index > snapshot.index);
        log.snapshot = Some(snapshot);
        Ok(())
    }
}
