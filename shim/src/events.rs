//! Task events to containerd: what happened to a task, translated into
//! containerd's event messages and forwarded over ttrpc to `TTRPC_ADDRESS`
//! (`containerd.services.events.ttrpc.v1.Events/Forward`).
//!
//! Events are sent in the order they are published, by one background task,
//! so an exit is never seen before the start it follows. A containerd that is
//! unreachable loses events (logged), it never blocks the task service.

use std::time::{Duration, SystemTime};

use containerd_shim_protos::{
    events::task::{
        TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM,
        TaskPaused, TaskResumed, TaskStart,
    },
    protobuf::{
        well_known_types::{any::Any, timestamp::Timestamp},
        MessageDyn, MessageField,
    },
    shim::events::{Envelope, ForwardRequest},
    shim_async::EventsClient,
};
use tokio::sync::mpsc;

/// Something that happened to a task or process, in our terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    /// A container's task was created.
    Create {
        /// Container id.
        id: String,
        /// Its bundle.
        bundle: String,
        /// Its stdio paths.
        stdin: String,
        /// stdout path.
        stdout: String,
        /// stderr path.
        stderr: String,
        /// Terminal requested.
        terminal: bool,
        /// Init PID (in the guest).
        pid: u32,
    },
    /// A container's init process started.
    Start {
        /// Container id.
        id: String,
        /// Init PID.
        pid: u32,
    },
    /// A process exited (after all its output was delivered).
    Exit {
        /// Container id.
        id: String,
        /// Exec id ("" for the init, reported as the container id).
        exec_id: String,
        /// PID.
        pid: u32,
        /// Exit status (128 + signal when killed).
        status: u32,
        /// When.
        at: SystemTime,
    },
    /// A container's task was deleted.
    Delete {
        /// Container id.
        id: String,
        /// Init PID.
        pid: u32,
        /// Exit status.
        status: u32,
        /// When it exited.
        at: SystemTime,
    },
    /// An exec process was added.
    ExecAdded {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
    },
    /// An exec process started.
    ExecStarted {
        /// Container id.
        id: String,
        /// Exec id.
        exec_id: String,
        /// PID.
        pid: u32,
    },
    /// The container was frozen.
    Paused {
        /// Container id.
        id: String,
    },
    /// The container was thawed.
    Resumed {
        /// Container id.
        id: String,
    },
    /// A process of the container was OOM-killed.
    Oom {
        /// Container id.
        id: String,
    },
}

fn timestamp(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    MessageField::some(Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    })
}

impl TaskEvent {
    /// containerd's topic and message for this event.
    pub fn to_containerd(&self) -> (&'static str, Box<dyn MessageDyn>) {
        match self.clone() {
            TaskEvent::Create {
                id,
                bundle,
                stdin,
                stdout,
                stderr,
                terminal,
                pid,
            } => (
                "/tasks/create",
                Box::new(TaskCreate {
                    container_id: id,
                    bundle,
                    io: MessageField::some(TaskIO {
                        stdin,
                        stdout,
                        stderr,
                        terminal,
                        ..Default::default()
                    }),
                    pid,
                    ..Default::default()
                }),
            ),
            TaskEvent::Start { id, pid } => (
                "/tasks/start",
                Box::new(TaskStart {
                    container_id: id,
                    pid,
                    ..Default::default()
                }),
            ),
            TaskEvent::Exit {
                id,
                exec_id,
                pid,
                status,
                at,
            } => (
                "/tasks/exit",
                Box::new(TaskExit {
                    // containerd names the init process by the container id.
                    id: if exec_id.is_empty() {
                        id.clone()
                    } else {
                        exec_id
                    },
                    container_id: id,
                    pid,
                    exit_status: status,
                    exited_at: timestamp(at),
                    ..Default::default()
                }),
            ),
            TaskEvent::Delete {
                id,
                pid,
                status,
                at,
            } => (
                "/tasks/delete",
                Box::new(TaskDelete {
                    id: id.clone(),
                    container_id: id,
                    pid,
                    exit_status: status,
                    exited_at: timestamp(at),
                    ..Default::default()
                }),
            ),
            TaskEvent::ExecAdded { id, exec_id } => (
                "/tasks/exec-added",
                Box::new(TaskExecAdded {
                    container_id: id,
                    exec_id,
                    ..Default::default()
                }),
            ),
            TaskEvent::ExecStarted { id, exec_id, pid } => (
                "/tasks/exec-started",
                Box::new(TaskExecStarted {
                    container_id: id,
                    exec_id,
                    pid,
                    ..Default::default()
                }),
            ),
            TaskEvent::Paused { id } => (
                "/tasks/paused",
                Box::new(TaskPaused {
                    container_id: id,
                    ..Default::default()
                }),
            ),
            TaskEvent::Resumed { id } => (
                "/tasks/resumed",
                Box::new(TaskResumed {
                    container_id: id,
                    ..Default::default()
                }),
            ),
            TaskEvent::Oom { id } => (
                "/tasks/oom",
                Box::new(TaskOOM {
                    container_id: id,
                    ..Default::default()
                }),
            ),
        }
    }

    /// The event wrapped for `Events/Forward`.
    pub fn envelope(&self, namespace: &str) -> Result<Envelope, protobuf::Error> {
        let (topic, msg) = self.to_containerd();
        let mut value = Vec::new();
        msg.write_to_vec_dyn(&mut value)?;
        Ok(Envelope {
            timestamp: timestamp(SystemTime::now()),
            namespace: namespace.to_string(),
            topic: topic.to_string(),
            event: MessageField::some(Any {
                // containerd resolves event types by their full protobuf name.
                type_url: msg.descriptor_dyn().full_name().to_string(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

/// Where task events go.
pub trait EventSink: Send + Sync {
    /// Queues `event`; never blocks.
    fn publish(&self, event: TaskEvent);
}

/// Forwards events to containerd's ttrpc address.
pub struct Publisher {
    tx: mpsc::UnboundedSender<TaskEvent>,
}

impl Publisher {
    /// Starts the forwarding task for containerd at `ttrpc_address` (a socket
    /// path), tagging events with `namespace`.
    pub fn start(ttrpc_address: String, namespace: String) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<TaskEvent>();
        tokio::spawn(async move {
            let mut client: Option<EventsClient> = None;
            while let Some(ev) = rx.recv().await {
                let envelope = match ev.envelope(&namespace) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot encode event");
                        continue;
                    }
                };
                let req = ForwardRequest {
                    envelope: MessageField::some(envelope),
                    ..Default::default()
                };
                // Two tries: the second after reconnecting.
                for _ in 0..2 {
                    if client.is_none() {
                        client = connect(&ttrpc_address).map(EventsClient::new);
                    }
                    let Some(c) = &client else { break };
                    let ctx =
                        ttrpc::context::with_timeout(Duration::from_secs(5).as_nanos() as i64);
                    match c.forward(ctx, &req).await {
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, topic = %ev.to_containerd().0, "cannot forward event");
                            client = None;
                        }
                    }
                }
            }
        });
        Publisher { tx }
    }
}

fn connect(address: &str) -> Option<ttrpc::asynchronous::Client> {
    let addr = if address.starts_with("unix://") {
        address.to_string()
    } else {
        format!("unix://{address}")
    };
    match ttrpc::asynchronous::Client::connect(&addr) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(address, error = %e, "cannot connect to containerd for events");
            None
        }
    }
}

impl EventSink for Publisher {
    fn publish(&self, event: TaskEvent) {
        tracing::debug!(?event, "event");
        let _ = self.tx.send(event);
    }
}

/// An [`EventSink`] that records events (tests).
#[derive(Default)]
pub struct RecordingSink {
    /// Events so far.
    pub events: crate::sync::Lock<Vec<TaskEvent>>,
}

impl EventSink for RecordingSink {
    fn publish(&self, event: TaskEvent) {
        self.events.lock().push(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    #[test]
    fn exit_of_init_is_named_by_the_container_and_typed_by_full_name() {
        let ev = TaskEvent::Exit {
            id: "c1".into(),
            exec_id: String::new(),
            pid: 7,
            status: 137,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(5),
        };
        let env = ev.envelope("k8s.io").unwrap();
        assert_eq!(env.topic, "/tasks/exit");
        assert_eq!(env.namespace, "k8s.io");
        let any = env.event.as_ref().unwrap();
        assert_eq!(any.type_url, "containerd.events.TaskExit");
        let exit = TaskExit::parse_from_bytes(&any.value).unwrap();
        assert_eq!((exit.id.as_str(), exit.container_id.as_str()), ("c1", "c1"));
        assert_eq!((exit.pid, exit.exit_status), (7, 137));
        assert_eq!(exit.exited_at.seconds, 5);
    }

    #[test]
    fn every_event_has_its_topic() {
        let id = || "c".to_string();
        let topics: Vec<&str> = [
            TaskEvent::Start { id: id(), pid: 1 },
            TaskEvent::ExecAdded {
                id: id(),
                exec_id: "e".into(),
            },
            TaskEvent::ExecStarted {
                id: id(),
                exec_id: "e".into(),
                pid: 2,
            },
            TaskEvent::Paused { id: id() },
            TaskEvent::Resumed { id: id() },
            TaskEvent::Oom { id: id() },
            TaskEvent::Delete {
                id: id(),
                pid: 1,
                status: 0,
                at: SystemTime::now(),
            },
        ]
        .iter()
        .map(|e| e.to_containerd().0)
        .collect();
        assert_eq!(
            topics,
            [
                "/tasks/start",
                "/tasks/exec-added",
                "/tasks/exec-started",
                "/tasks/paused",
                "/tasks/resumed",
                "/tasks/oom",
                "/tasks/delete"
            ]
        );
    }
}
