//! QMP, QEMU's JSON control protocol: hot-adding and removing disks, pausing,
//! stopping the VM.
//!
//! One request at a time (the client is behind a mutex in the sandbox).
//! Asynchronous events QEMU interleaves with replies are kept in a small queue
//! so [`Qmp::wait_event`] can find them later.

use std::{
    collections::VecDeque,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};
use veil_common::{Classify, Kind};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
};

/// Errors of a QMP exchange.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket did not accept a connection in time.
    #[error("cannot connect to {path} within {timeout:?}")]
    Connect {
        /// QMP socket.
        path: PathBuf,
        /// How long we tried.
        timeout: Duration,
    },
    /// Reading or writing the socket failed.
    #[error("I/O on the QMP socket")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection (it exited).
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// A line was not JSON.
    #[error("malformed QMP message")]
    Json(#[from] serde_json::Error),
    /// QEMU answered a command with an error.
    #[error("command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// An expected event did not arrive in time.
    #[error("no {0} event in time")]
    EventTimeout(String),
    /// The shim could not open a disk to hand to QEMU.
    #[error("cannot open {path} for the VM")]
    Open {
        /// The image or device.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Classify for QmpError {
    fn kind(&self) -> Kind {
        match self {
            QmpError::Connect { .. } | QmpError::Io(_) | QmpError::Closed => Kind::Unavailable,
            QmpError::Json(_) | QmpError::Command { .. } => Kind::Internal,
            QmpError::EventTimeout(_) => Kind::DeadlineExceeded,
            QmpError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Kind::NotFound
            }
            QmpError::Open { .. } => Kind::Internal,
        }
    }
}

/// A connected QMP client in command mode.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connects to `path` (retrying while QEMU starts, up to `timeout`), reads
    /// the greeting and enters command mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(_) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        timeout,
                    })
                }
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            events: VecDeque::new(),
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Command {
                command: "greeting".into(),
                class: "Protocol".into(),
                desc: "no QMP greeting".into(),
            });
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(QmpError::Closed);
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs `command` with `arguments`; returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_with_fd(command, arguments, None).await
    }

    /// [`Qmp::execute`], passing `fd` along with the command (`SCM_RIGHTS`),
    /// as `add-fd` wants it.
    async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let mut req = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            req["arguments"] = arguments;
        }
        let mut bytes = serde_json::to_vec(&req)?;
        bytes.push(b'\n');
        match fd {
            None => self.writer.write_all(&bytes).await?,
            Some(fd) => self.send_with_fd(&bytes, fd).await?,
        }
        loop {
            let msg = self.read_message().await?;
            if msg.get("event").is_some() {
                self.remember(msg);
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                let text = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
        }
    }

    /// Writes `bytes` (one short command line) with `fd` attached.
    async fn send_with_fd(&mut self, bytes: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let stream: &UnixStream = self.writer.as_ref();
        let fds = [fd.as_raw_fd()];
        loop {
            stream.writable().await?;
            let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                let iov = [std::io::IoSlice::new(bytes)];
                let cmsg = [ControlMessage::ScmRights(&fds)];
                sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
                    .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    // The fd went with the first bytes; the rest as usual.
                    return self.writer.write_all(&bytes[n..]).await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn remember(&mut self, event: Value) {
        if self.events.len() >= 64 {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Waits up to `timeout` for an event named `name` whose `data` satisfies
    /// `matches` (already received ones count).
    pub async fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let is_it = |e: &Value| {
            e.get("event").and_then(Value::as_str) == Some(name)
                && matches(e.get("data").unwrap_or(&Value::Null))
        };
        if let Some(pos) = self.events.iter().position(is_it) {
            return Ok(self.events.remove(pos).unwrap_or(Value::Null));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.read_message())
                .await
                .map_err(|_| QmpError::EventTimeout(name.to_string()))??;
            if is_it(&msg) {
                return Ok(msg);
            }
            if msg.get("event").is_some() {
                self.remember(msg);
            }
        }
    }

    /// Hot-adds the raw image `path` as a SCSI disk on the controller `scsi0`
    /// with SCSI id `target` and the serial `serial` (the guest finds the disk
    /// by it). `node` names the block node and the device.
    pub async fn hot_add_disk(
        &mut self,
        node: &str,
        path: &Path,
        serial: &str,
        target: u32,
        read_only: bool,
    ) -> Result<(), QmpError> {
        self.hot_add(node, "file", path, serial, target, read_only)
            .await
    }

    /// [`Qmp::hot_add_disk`] of a host block device (`host_device`: a
    /// block volume) rather than an image file.
    pub async fn hot_add_block_device(
        &mut self,
        node: &str,
        path: &Path,
        serial: &str,
        target: u32,
        read_only: bool,
    ) -> Result<(), QmpError> {
        self.hot_add(node, "host_device", path, serial, target, read_only)
            .await
    }

    async fn hot_add(
        &mut self,
        node: &str,
        driver: &str,
        path: &Path,
        serial: &str,
        target: u32,
        read_only: bool,
    ) -> Result<(), QmpError> {
        // The shim opens the disk and hands QEMU the open file (an fd set),
        // so QEMU, which runs as the pod's own unprivileged user, needs no
        // access to the path.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| QmpError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let set = self
            .execute_with_fd("add-fd", json!({}), Some(file.as_fd()))
            .await?;
        drop(file);
        let Some(fdset) = set.get("fdset-id").and_then(Value::as_i64) else {
            return Err(QmpError::Command {
                command: "add-fd".into(),
                class: "Protocol".into(),
                desc: format!("no fdset-id in the reply {set}"),
            });
        };
        let added = self
            .execute(
                "blockdev-add",
                json!({
                    "driver": "raw",
                    "node-name": node,
                    "read-only": read_only,
                    "file": {
                        "driver": driver,
                        "filename": format!("/dev/fdset/{fdset}"),
                        "read-only": read_only,
                    },
                }),
            )
            .await;
        // The block node holds its own copy of the fd: the set has served.
        let _ = self
            .execute("remove-fd", json!({ "fdset-id": fdset }))
            .await;
        added?;
        let added = self
            .execute(
                "device_add",
                json!({
                    "driver": "scsi-hd",
                    "id": node,
                    "bus": "scsi0.0",
                    "channel": 0,
                    "scsi-id": target,
                    "lun": 0,
                    "drive": node,
                    "serial": serial,
                }),
            )
            .await;
        if let Err(e) = added {
            let _ = self
                .execute("blockdev-del", json!({ "node-name": node }))
                .await;
            return Err(e);
        }
        Ok(())
    }

    /// Removes a disk added with [`Qmp::hot_add_disk`]: the device, then (once
    /// QEMU reports it gone) its block node.
    pub async fn hot_remove_disk(&mut self, node: &str) -> Result<(), QmpError> {
        self.execute("device_del", json!({ "id": node })).await?;
        let id = node.to_string();
        self.wait_event(
            "DEVICE_DELETED",
            move |d| d.get("device").and_then(Value::as_str) == Some(id.as_str()),
            Duration::from_secs(10),
        )
        .await?;
        self.execute("blockdev-del", json!({ "node-name": node }))
            .await?;
        Ok(())
    }

    /// Stops the VM's vCPUs (`stop`) or lets them run again (`cont`).
    pub async fn set_running(&mut self, running: bool) -> Result<(), QmpError> {
        let cmd = if running { "cont" } else { "stop" };
        self.execute(cmd, json!({})).await.map(|_| ())
    }

    /// Asks QEMU to exit at once.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        self.execute("quit", json!({})).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QEMU: greets, answers each command with a scripted reply and
    /// records what it was sent.
    async fn fake_qemu(listener: UnixListener, replies: Vec<&'static str>) -> Vec<Value> {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        for reply in std::iter::once("{\"return\": {}}").chain(replies) {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap() == 0 {
                break;
            }
            seen.push(serde_json::from_str::<Value>(&line).unwrap());
            w.write_all(reply.as_bytes()).await.unwrap();
            w.write_all(b"\n").await.unwrap();
        }
        seen
    }

    #[tokio::test]
    async fn hot_add_sends_blockdev_then_scsi_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let image = dir.path().join("a.erofs");
        std::fs::write(&image, b"image").unwrap();
        let l = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_qemu(
            l,
            vec![
                "{\"return\": {\"fdset-id\": 3, \"fd\": 25}}",
                "{\"return\": {}}",
                "{\"return\": {}}",
                "{\"return\": {}}",
            ],
        ));
        let mut q = Qmp::connect(&path, Duration::from_secs(2)).await.unwrap();
        q.hot_add_disk("img1", &image, "veil-img1", 1, true)
            .await
            .unwrap();
        drop(q);
        let seen = server.await.unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        // QEMU gets the open file, not the path.
        assert_eq!(seen[1]["execute"], "add-fd");
        assert_eq!(seen[2]["execute"], "blockdev-add");
        assert_eq!(seen[2]["arguments"]["file"]["filename"], "/dev/fdset/3");
        assert_eq!(seen[2]["arguments"]["read-only"], true);
        assert_eq!(seen[3]["execute"], "remove-fd");
        assert_eq!(seen[3]["arguments"]["fdset-id"], 3);
        assert_eq!(seen[4]["execute"], "device_add");
        assert_eq!(seen[4]["arguments"]["driver"], "scsi-hd");
        assert_eq!(seen[4]["arguments"]["bus"], "scsi0.0");
        assert_eq!(seen[4]["arguments"]["scsi-id"], 1);
        assert_eq!(seen[4]["arguments"]["serial"], "veil-img1");
        // A missing image fails before QEMU is asked anything.
        let l = UnixListener::bind(dir.path().join("q2.sock")).unwrap();
        let server = tokio::spawn(fake_qemu(l, vec![]));
        let mut q = Qmp::connect(&dir.path().join("q2.sock"), Duration::from_secs(2))
            .await
            .unwrap();
        let e = q
            .hot_add_disk("img2", &dir.path().join("none"), "s", 2, true)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), Kind::NotFound, "{e}");
        drop(q);
        assert_eq!(server.await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_failed_device_add_removes_the_block_node_and_names_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        let image = dir.path().join("a");
        std::fs::write(&image, b"image").unwrap();
        let server = tokio::spawn(fake_qemu(
            l,
            vec![
                "{\"return\": {\"fdset-id\": 0, \"fd\": 25}}",
                "{\"return\": {}}",
                "{\"return\": {}}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Bus 'scsi0.0' not found\"}}",
                "{\"return\": {}}",
            ],
        ));
        let mut q = Qmp::connect(&path, Duration::from_secs(2)).await.unwrap();
        let e = q
            .hot_add_disk("img1", &image, "s", 1, true)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, QmpError::Command { command, class, .. } if command == "device_add" && class == "GenericError"),
            "{e:?}"
        );
        drop(q);
        let seen = server.await.unwrap();
        assert_eq!(seen[5]["execute"], "blockdev-del");
    }

    #[tokio::test]
    async fn events_interleaved_with_replies_are_kept_for_wait_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_qemu(
            l,
            vec![
                "{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"img1\"}}\n{\"return\": {}}",
                "{\"return\": {}}",
            ],
        ));
        let mut q = Qmp::connect(&path, Duration::from_secs(2)).await.unwrap();
        q.hot_remove_disk("img1").await.unwrap();
        drop(q);
        let seen = server.await.unwrap();
        assert_eq!(seen[1]["execute"], "device_del");
        assert_eq!(seen[2]["execute"], "blockdev-del");
    }
}
