//! Group commit: one background task fsyncs the database for every writer that asked since the
//! previous flush, so many groups share each fsync.

use crate::StorageError;
use crate::marks::Marks;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

type Observer = Box<dyn Fn(Duration) + Send + Sync>;

#[derive(Clone, Default)]
struct Flushed {
    /// Highest ticket covered by a completed flush.
    through: u64,
    /// Set once a flush has failed; every later wait fails with it.
    failure: Option<String>,
}

/// Handle owned by the stores; dropping the last one stops the flusher task after a final
/// flush, which releases the database.
pub struct Flusher {
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Shared {
    /// Tickets handed out; a ticket is taken after the caller's write has been applied.
    issued: AtomicU64,
    wake: Notify,
    closed: AtomicBool,
    flushed: watch::Sender<Flushed>,
    observer: Mutex<Option<Observer>>,
}

impl Flusher {
    /// Starts the flusher task of `db`; it must run inside a Tokio runtime.
    pub fn start(db: sled::Db) -> Arc<Self> {
        Self::start_marking(db, None)
    }

    /// Starts the flusher task of `db`, which also writes `marks` with every flush.
    pub(crate) fn start_marking(db: sled::Db, marks: Option<Arc<Marks>>) -> Arc<Self> {
        let shared = Arc::new(Shared {
            issued: AtomicU64::new(0),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            flushed: watch::Sender::new(Flushed::default()),
            observer: Mutex::new(None),
        });
        let task = tokio::spawn(Arc::clone(&shared).run(db, marks));
        Arc::new(Self {
            shared,
            task: Mutex::new(Some(task)),
        })
    }

    /// Stops the task after a last flush and waits for it, so the database can be reopened.
    pub(crate) async fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    pub(crate) fn set_observer(&self, observer: Observer) {
        *self
            .shared
            .observer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(observer);
    }

    /// Waits until every write applied to the database before this call is on disk. Calls
    /// that overlap share one flush. After a failed flush, every call fails.
    pub async fn wait(&self) -> Result<(), StorageError> {
        self.shared.wait().await
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

impl Shared {
    async fn wait(&self) -> Result<(), StorageError> {
        let ticket = self.issued.fetch_add(1, Ordering::AcqRel) + 1;
        let mut rx = self.flushed.subscribe();
        self.wake.notify_one();
        let state = rx
            .wait_for(|f| f.through >= ticket || f.failure.is_some())
            .await
            .map_err(|_| StorageError::FlushFailed("flusher task stopped".into()))?;
        match &state.failure {
            Some(reason) => Err(StorageError::FlushFailed(reason.clone())),
            None => Ok(()),
        }
    }

    async fn run(self: Arc<Self>, db: sled::Db, marks: Option<Arc<Marks>>) {
        loop {
            self.wake.notified().await;
            let closing = self.closed.load(Ordering::Acquire);
            // Every ticket up to `target` belongs to a write applied before this load, so the
            // flush below covers it.
            let target = self.issued.load(Ordering::Acquire);
            if target <= self.flushed.borrow().through {
                if closing {
                    return;
                }
                continue;
            }
            let started = Instant::now();
            let db = db.clone();
            let marks = marks.clone();
            let result = tokio::task::spawn_blocking(move || {
                // The mark goes in after every write of the tickets up to `target`, and the file
                // records it before any of their waiters is released.
                let mark = marks.as_ref().map(|m| m.stage()).transpose()?;
                db.flush()?;
                if let (Some(mark), Some(marks)) = (mark, &marks) {
                    marks.record(mark)?;
                }
                Ok::<_, StorageError>(())
            })
            .await;
            if let Some(observe) = self
                .observer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                observe(started.elapsed());
            }
            match result {
                Ok(Ok(())) => {
                    self.flushed.send_modify(|f| f.through = target);
                    if closing {
                        return;
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "storage flush failed; refusing further writes");
                    let reason = match e {
                        StorageError::FlushFailed(reason) => reason,
                        other => other.to_string(),
                    };
                    self.flushed.send_modify(|f| f.failure = Some(reason));
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "storage flush task failed");
                    self.flushed
                        .send_modify(|f| f.failure = Some(e.to_string()));
                    return;
                }
            }
        }
    }
}
