//! The publisher's cursor: the sequence number of the last own event the broker confirmed.
//!
//! Publishing resumes after it, so it must survive a synchronizer restart. It is kept in memory
//! (shared by every synchronizer built with the same [`CursorStore`], e.g. a [`Deployment`]
//! restarting one) or in a small file. The file is written (temporary file, fsync, rename) at
//! most every [`WRITE_EVERY`], not per message: a cursor that lags only makes the publisher
//! send some events again, and consumers drop them as duplicates.
//!
//! [`Deployment`]: crate::deployment::Deployment

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// Shortest time between two writes of a cursor file.
pub const WRITE_EVERY: Duration = Duration::from_millis(50);

/// Where a RabbitMQ publisher keeps its cursor (see the module documentation). Cheap to clone;
/// clones share the cursor.
#[derive(Debug, Clone)]
pub struct CursorStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The last confirmed sequence number.
    value: AtomicU64,
    /// The file that keeps it, if any.
    file: Option<PathBuf>,
    /// The value the file holds (as far as this store knows).
    written: AtomicU64,
    /// Woken when `value` changes.
    changed: Notify,
}

impl CursorStore {
    /// A cursor in memory, starting at 0 (publish from the first event).
    pub fn memory() -> Self {
        Self::with(0, None)
    }

    /// A cursor kept in the file at `path`, starting from the value stored there (0 when there
    /// is no file yet, or when it does not hold a number: that only causes duplicates). The
    /// parent directory is created if missing.
    pub fn file(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::storage::create_private_dir(parent)?;
        }
        let value = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().unwrap_or_else(|_| {
                tracing::warn!(
                    path = %path.display(),
                    "the RabbitMQ publisher's cursor file holds no number; publishing from the start"
                );
                0
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e.into()),
        };
        Ok(Self::with(value, Some(path)))
    }

    fn with(value: u64, file: Option<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                value: AtomicU64::new(value),
                file,
                written: AtomicU64::new(value),
                changed: Notify::new(),
            }),
        }
    }

    /// The file that keeps the cursor, if any.
    pub fn path(&self) -> Option<&Path> {
        self.inner.file.as_deref()
    }

    /// The sequence number of the last own event the broker confirmed.
    pub fn get(&self) -> u64 {
        self.inner.value.load(Ordering::Acquire)
    }

    /// Records that the broker confirmed every own event up to `seq` (a lower value than the
    /// current one is ignored).
    pub fn advance(&self, seq: u64) {
        if self.inner.value.fetch_max(seq, Ordering::AcqRel) < seq {
            self.inner.changed.notify_one();
        }
    }

    /// Sets the cursor back to `seq` (when it is ahead of what the cluster has committed).
    pub fn rewind(&self, seq: u64) {
        self.inner.value.store(seq, Ordering::Release);
        self.inner.changed.notify_one();
    }

    /// Writes the cursor to its file whenever it changes, at most every [`WRITE_EVERY`], until
    /// `shutdown` is cancelled; then writes it a last time. Returns at once for a cursor in
    /// memory. A failed write is logged and retried on the next change.
    pub async fn keep_written(&self, shutdown: &CancellationToken) {
        let Some(path) = self.inner.file.clone() else {
            return;
        };
        loop {
            let stopping = tokio::select! {
                () = self.inner.changed.notified() => false,
                () = shutdown.cancelled() => true,
            };
            let value = self.get();
            if value != self.inner.written.load(Ordering::Acquire) {
                match write_cursor(path.clone(), value).await {
                    Ok(()) => self.inner.written.store(value, Ordering::Release),
                    Err(e) => tracing::warn!(
                        path = %path.display(),
                        "cannot write the RabbitMQ publisher's cursor: {e}"
                    ),
                }
            }
            if stopping {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(WRITE_EVERY) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }
}

/// Replaces the file at `path` with `value`: a temporary file, fsync, rename, fsync of the
/// directory.
async fn write_cursor(path: PathBuf, value: u64) -> Result<()> {
    tokio::task::spawn_blocking(move || -> Result<()> {
        use std::io::Write;
        let mut temporary = path.clone().into_os_string();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(format!("{value}\n").as_bytes())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temporary, &path)?;
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Makes the rename durable; not every platform can open a directory.
            if let Ok(dir) = std::fs::File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| std::io::Error::other(format!("cursor writer failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_cursor_is_shared_by_clones_and_only_moves_forward_unless_rewound() {
        let cursor = CursorStore::memory();
        let clone = cursor.clone();
        assert_eq!(cursor.get(), 0);
        cursor.advance(7);
        clone.advance(5);
        assert_eq!(clone.get(), 7);
        clone.rewind(3);
        assert_eq!(cursor.get(), 3);
        assert!(cursor.path().is_none());
    }

    #[tokio::test]
    async fn a_file_cursor_survives_a_new_store_and_ignores_garbage() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("sync").join("amqp.cursor");
        let cursor = CursorStore::file(&path).expect("open");
        assert_eq!(cursor.get(), 0);
        let shutdown = CancellationToken::new();
        let writer = tokio::spawn({
            let cursor = cursor.clone();
            let shutdown = shutdown.clone();
            async move { cursor.keep_written(&shutdown).await }
        });
        cursor.advance(41);
        cursor.advance(42);
        shutdown.cancel();
        writer.await.expect("writer ends");
        assert_eq!(CursorStore::file(&path).expect("reopen").get(), 42);

        std::fs::write(&path, "not a number").expect("write garbage");
        assert_eq!(CursorStore::file(&path).expect("reopen").get(), 0);
    }
}
