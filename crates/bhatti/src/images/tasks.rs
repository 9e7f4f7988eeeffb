//! Long operations (image pulls) as tasks: an in-memory registry, one entry
//! per task with its owner, a cancel token and its current view on a
//! `watch` channel (progress updates are cheap and anyone can wait for the
//! end). Finished tasks are kept for [`KEEP_FINISHED`], then forgotten;
//! a daemon restart forgets all of them (their work dirs are swept).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api_types::{rfc3339_ms, ImageView, TaskPhase, TaskProgress, TaskState, TaskView};

/// How long a finished task can still be read.
pub const KEEP_FINISHED: Duration = Duration::from_secs(3600);

/// One task.
#[derive(Debug)]
pub struct Task {
    pub id: String,
    pub owner: String,
    pub cancel: CancellationToken,
    view: watch::Sender<TaskView>,
    finished: Mutex<Option<Instant>>,
}

impl Task {
    /// What it looks like now.
    pub fn view(&self) -> TaskView {
        self.view.borrow().clone()
    }

    pub fn is_running(&self) -> bool {
        self.view.borrow().state == TaskState::Running
    }

    /// A new phase (progress starts over).
    pub fn phase(&self, phase: TaskPhase) {
        self.view.send_modify(|v| {
            if v.phase != phase {
                v.phase = phase;
                v.progress = TaskProgress::default();
            }
        });
    }

    pub fn progress(&self, done: u64, total: u64) {
        self.view
            .send_modify(|v| v.progress = TaskProgress { done, total });
    }

    /// The end: succeeded with an image, failed, or cancelled.
    pub fn finish(&self, outcome: Result<ImageView, (u16, String)>) {
        let cancelled = self.cancel.is_cancelled();
        self.view.send_modify(|v| match outcome {
            Ok(image) => {
                v.state = TaskState::Succeeded;
                v.image = Some(image);
            }
            Err(_) if cancelled => {
                v.state = TaskState::Cancelled;
                v.error = Some("cancelled".into());
            }
            Err((status, message)) => {
                v.state = TaskState::Failed;
                v.error = Some(message);
                v.error_status = Some(status);
            }
        });
        if let Ok(mut f) = self.finished.lock() {
            *f = Some(Instant::now());
        }
    }

    /// Waits until it has finished; returns its last view.
    pub async fn wait(&self) -> TaskView {
        let mut rx = self.view.subscribe();
        let r = rx.wait_for(|v| v.state != TaskState::Running).await;
        match r {
            Ok(v) => v.clone(),
            Err(_) => self.view(),
        }
    }
}

/// The registry.
#[derive(Debug, Default)]
pub struct Tasks {
    map: Mutex<HashMap<String, Arc<Task>>>,
}

impl Tasks {
    /// Registers a running task of `owner`.
    pub fn start(&self, owner: &str, kind: &str, reference: Option<String>) -> Arc<Task> {
        let id = crate::store::new_id("task_");
        let (view, _) = watch::channel(TaskView {
            id: id.clone(),
            kind: kind.to_owned(),
            state: TaskState::Running,
            phase: TaskPhase::Resolving,
            progress: TaskProgress::default(),
            reference,
            image: None,
            error: None,
            error_status: None,
            created_at: rfc3339_ms(crate::store::now_ms()),
        });
        let task = Arc::new(Task {
            id: id.clone(),
            owner: owner.to_owned(),
            cancel: CancellationToken::new(),
            view,
            finished: Mutex::new(None),
        });
        let mut map = self.lock();
        prune(&mut map);
        map.insert(id, task.clone());
        task
    }

    /// The owner's task `id` (another user's is `None`).
    pub fn get(&self, owner: &str, id: &str) -> Option<Arc<Task>> {
        self.lock().get(id).filter(|t| t.owner == owner).cloned()
    }

    /// The owner's tasks, oldest first.
    pub fn list(&self, owner: &str) -> Vec<TaskView> {
        let mut map = self.lock();
        prune(&mut map);
        let mut v: Vec<TaskView> = map
            .values()
            .filter(|t| t.owner == owner)
            .map(|t| t.view())
            .collect();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    /// How many of the owner's tasks are running.
    pub fn running(&self, owner: &str) -> usize {
        self.lock()
            .values()
            .filter(|t| t.owner == owner && t.is_running())
            .count()
    }

    /// Cancels every running task (daemon shutdown).
    pub fn cancel_all(&self) {
        for t in self.lock().values() {
            t.cancel.cancel();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Task>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn prune(map: &mut HashMap<String, Arc<Task>>) {
    map.retain(|_, t| {
        t.finished
            .lock()
            .ok()
            .and_then(|f| *f)
            .is_none_or(|at| at.elapsed() < KEEP_FINISHED)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_are_per_owner_and_end_once() {
        let tasks = Tasks::default();
        let t = tasks.start("alice", "pull", Some("reg/x:1".into()));
        assert!(tasks.get("bob", &t.id).is_none());
        assert_eq!(tasks.running("alice"), 1);
        t.phase(TaskPhase::Downloading);
        t.progress(5, 10);
        assert_eq!(tasks.list("alice")[0].progress.done, 5);
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.wait().await })
        };
        t.finish(Err((401, "registry: unauthorized".into())));
        let v = waiter.await.unwrap();
        assert_eq!(v.state, TaskState::Failed);
        assert_eq!(v.error_status, Some(401));
        assert_eq!(tasks.running("alice"), 0);
        assert!(tasks.list("bob").is_empty());

        let c = tasks.start("alice", "pull", None);
        tasks.cancel_all();
        c.finish(Err((500, "whatever".into())));
        assert_eq!(c.view().state, TaskState::Cancelled);
    }
}
