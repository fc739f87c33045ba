//! The queue of asynchronous events (exits, OOM kills) the shim polls with
//! `Events.GetEvent`. Bounded: when the shim does not poll, the oldest events
//! are dropped (and logged) rather than growing without limit.

use std::{collections::VecDeque, sync::Mutex};

use tokio::sync::Notify;
use veil_protocol::agent::{Event, ExitEvent, OomEvent};

/// Events kept while nobody polls.
const MAX_QUEUED: usize = 4096;

/// The event queue.
#[derive(Default)]
pub struct Events {
    queue: Mutex<VecDeque<Event>>,
    ready: Notify,
}

impl Events {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event.
    pub fn push(&self, e: Event) {
        {
            let mut q = self.lock();
            if q.len() >= MAX_QUEUED {
                q.pop_front();
                tracing::warn!("event queue full: oldest event dropped");
            }
            q.push_back(e);
        }
        self.ready.notify_one();
    }

    /// Queues an exit event.
    pub fn exit(&self, container_id: &str, exec_id: &str, pid: i32, status: i32, at_ns: i64) {
        let mut x = ExitEvent::new();
        x.container_id = container_id.to_string();
        x.exec_id = exec_id.to_string();
        x.pid = pid as u32;
        x.exit_status = status;
        x.exited_at_ns = at_ns;
        let mut e = Event::new();
        e.set_exit(x);
        self.push(e);
    }

    /// Queues an OOM event.
    pub fn oom(&self, container_id: &str) {
        let mut o = OomEvent::new();
        o.container_id = container_id.to_string();
        let mut e = Event::new();
        e.set_oom(o);
        self.push(e);
    }

    /// The next event, waiting for one.
    pub async fn next(&self) -> Event {
        loop {
            let notified = self.ready.notified();
            if let Some(e) = self.lock().pop_front() {
                return e;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_in_order_and_waits() {
        let ev = std::sync::Arc::new(Events::default());
        ev.oom("a");
        ev.exit("a", "", 5, 137, 1);
        assert!(ev.next().await.has_oom());
        assert_eq!(ev.next().await.exit().exit_status, 137);
        let ev2 = ev.clone();
        let waiter = tokio::spawn(async move { ev2.next().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        ev.oom("b");
        assert_eq!(waiter.await.unwrap().oom().container_id, "b");
    }
}
