//! Labelling the node through the Kubernetes API, from inside a pod.
//!
//! One request: a JSON merge patch of the node's labels
//! (`PATCH /api/v1/nodes/NAME`), over TLS to the API server named by the
//! in-cluster environment, with the pod's service-account token. The
//! ServiceAccount may patch only `veil.dev/` labels of its own node (the
//! ValidatingAdmissionPolicy in `deploy/kubernetes/rbac.yaml`).

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};

/// The label prefix: `veil.dev/handler-NAME=true` per enabled handler.
pub const LABEL_PREFIX: &str = "veil.dev/handler-";

/// Where a pod's service account is mounted.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Errors talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// A service-account file is missing.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The CA bundle has no usable certificate.
    #[error("no CA certificate in {0}")]
    Ca(PathBuf),
    /// TLS set-up or handshake.
    #[error("TLS to the API server")]
    Tls(#[source] rustls::Error),
    /// The connection.
    #[error("connecting to the API server {0}")]
    Connect(String, #[source] std::io::Error),
    /// The server said no.
    #[error("API server answered {status}: {body}")]
    Status {
        /// HTTP status code.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The answer is not HTTP.
    #[error("malformed answer from the API server")]
    Malformed,
}

/// The API server and credentials of the pod this runs in.
#[derive(Debug, Clone)]
pub struct InCluster {
    /// `host:port`.
    pub server: String,
    /// The TLS name checked against the server certificate.
    pub tls_name: String,
    /// Bearer token.
    pub token: String,
    /// CA certificates (PEM).
    pub ca_pem: Vec<u8>,
    /// This node's name (from the downward API, `NODE_NAME`).
    pub node: String,
}

impl InCluster {
    /// From the environment Kubernetes gives a pod; `None` outside a pod (no
    /// `KUBERNETES_SERVICE_HOST`) or without `NODE_NAME`.
    pub fn from_env() -> Result<Option<Self>, KubeError> {
        let (Ok(host), Ok(node)) = (
            std::env::var("KUBERNETES_SERVICE_HOST"),
            std::env::var("NODE_NAME"),
        ) else {
            return Ok(None);
        };
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let read = |n: &str| {
            let p = Path::new(SA_DIR).join(n);
            std::fs::read(&p).map_err(|e| KubeError::Read(p, e))
        };
        let server = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Some(InCluster {
            server,
            // The API server's certificate carries its service IP.
            tls_name: host,
            token: String::from_utf8_lossy(&read("token")?).trim().to_string(),
            ca_pem: read("ca.crt")?,
            node,
        }))
    }

    /// Sets `veil.dev/handler-H=true` for `enabled` and removes the label of
    /// every other handler in `all`.
    pub fn label(&self, enabled: &[String], all: &[&str]) -> Result<(), KubeError> {
        let labels: serde_json::Map<String, serde_json::Value> = all
            .iter()
            .map(|h| {
                let v = if enabled.iter().any(|e| e == h) {
                    serde_json::Value::from("true")
                } else {
                    serde_json::Value::Null
                };
                (format!("{LABEL_PREFIX}{h}"), v)
            })
            .collect();
        let body = serde_json::json!({"metadata": {"labels": labels}}).to_string();
        self.patch(&format!("/api/v1/nodes/{}", self.node), &body)
    }

    fn patch(&self, path: &str, body: &str) -> Result<(), KubeError> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = PathBuf::from(SA_DIR).join("ca.crt");
        for c in CertificateDer::pem_slice_iter(&self.ca_pem).flatten() {
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err(KubeError::Ca(ca));
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(self.tls_name.clone()).map_err(|_| KubeError::Malformed)?;
        let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(KubeError::Tls)?;
        let sock = TcpStream::connect(&self.server)
            .map_err(|e| KubeError::Connect(self.server.clone(), e))?;
        let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let req = format!(
            "PATCH {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/merge-patch+json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.server,
            self.token,
            body.len()
        );
        let connect_err = |e| KubeError::Connect(self.server.clone(), e);
        tls.write_all(req.as_bytes()).map_err(connect_err)?;
        let mut answer = Vec::new();
        // A server that closes without close_notify still gave its answer.
        if let Err(e) = tls.read_to_end(&mut answer) {
            if answer.is_empty() {
                return Err(connect_err(e));
            }
        }
        let text = String::from_utf8_lossy(&answer);
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or(KubeError::Malformed)?;
        if !(200..300).contains(&status) {
            let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
            return Err(KubeError::Status {
                status,
                body: body.chars().take(300).collect(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-request TLS server on loopback: returns what it was sent.
    fn serve_once(status: &'static str) -> (InCluster, std::thread::JoinHandle<String>) {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = rustls_pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![der], key)
            .unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, s);
            let mut buf = vec![0u8; 8192];
            let mut got = Vec::new();
            while !String::from_utf8_lossy(&got).contains("}}}") {
                let n = tls.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            let body = "{\"kind\":\"Status\"}";
            let _ = write!(
                tls,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            tls.conn.send_close_notify();
            let _ = tls.flush();
            String::from_utf8_lossy(&got).into_owned()
        });
        let k = InCluster {
            server: addr.to_string(),
            tls_name: "127.0.0.1".into(),
            token: "tok".into(),
            ca_pem: cert.cert.pem().into_bytes(),
            node: "node-1".into(),
        };
        (k, h)
    }

    #[test]
    fn labels_enabled_handlers_and_clears_the_others() {
        let (k, h) = serve_once("200 OK");
        k.label(
            &["veil".into(), "veil-sim".into()],
            &["veil", "veil-sim", "veil-snp"],
        )
        .unwrap();
        let req = h.join().unwrap();
        assert!(
            req.starts_with("PATCH /api/v1/nodes/node-1 HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(req.contains("Authorization: Bearer tok\r\n"), "{req}");
        assert!(
            req.contains("Content-Type: application/merge-patch+json"),
            "{req}"
        );
        let body: serde_json::Value =
            serde_json::from_str(req.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let l = &body["metadata"]["labels"];
        assert_eq!(l["veil.dev/handler-veil"], "true");
        assert_eq!(l["veil.dev/handler-veil-sim"], "true");
        assert!(l["veil.dev/handler-veil-snp"].is_null());
    }

    #[test]
    fn a_refusal_is_an_error_with_its_status() {
        let (k, h) = serve_once("403 Forbidden");
        let e = k.label(&[], &["veil"]).unwrap_err();
        h.join().unwrap();
        assert!(matches!(e, KubeError::Status { status: 403, .. }), "{e}");
    }
}
