//! The command line containerd gives a v2 shim: Go-style flags
//! (`-namespace NS -id ID -address SOCK -publish-binary BIN -bundle DIR
//! -debug`) and an action (`start`, `delete`, or none to serve).

/// Errors in the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// A flag that needs a value has none.
    #[error("flag -{0} needs a value")]
    MissingValue(String),
    /// A flag we do not know.
    #[error("unknown flag -{0}")]
    Unknown(String),
    /// A required flag is absent.
    #[error("-{0} is required")]
    Required(&'static str),
    /// More than one action.
    #[error("unexpected argument {0}")]
    Extra(String),
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start (or reuse) the pod's shim and print its address.
    Start,
    /// Clean up after a shim that is gone.
    Delete,
    /// Serve the task API on the inherited socket (the daemon).
    Serve,
    /// Print the version.
    Version,
    /// Answer containerd 2.x's `-info` with a `RuntimeInfo` (see
    /// [`crate::handshake`]).
    Info,
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// containerd namespace.
    pub namespace: String,
    /// Container (task) id.
    pub id: String,
    /// containerd's gRPC socket.
    pub address: String,
    /// `containerd` binary for publishing (unused: events go over ttrpc).
    pub publish_binary: String,
    /// Bundle directory (`delete`; otherwise the working directory).
    pub bundle: String,
    /// Our ttrpc socket address (serve).
    pub socket: String,
    /// Debug logging.
    pub debug: bool,
    /// The action.
    pub action: Action,
}

impl Args {
    /// Parses the arguments after the program name.
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Self, ArgsError> {
        let mut a = Args {
            namespace: String::new(),
            id: String::new(),
            address: String::new(),
            publish_binary: String::new(),
            bundle: String::new(),
            socket: String::new(),
            debug: false,
            action: Action::Serve,
        };
        let mut action = None;
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
                let act = match arg.as_str() {
                    "start" => Action::Start,
                    "delete" => Action::Delete,
                    _ => return Err(ArgsError::Extra(arg)),
                };
                if action.replace(act).is_some() {
                    return Err(ArgsError::Extra(arg));
                }
                continue;
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (flag.to_string(), None),
            };
            match name.as_str() {
                "debug" => {
                    a.debug = inline.map(|v| v != "false").unwrap_or(true);
                    continue;
                }
                "v" | "version" => {
                    action = Some(Action::Version);
                    continue;
                }
                "info" => {
                    action = Some(Action::Info);
                    continue;
                }
                _ => {}
            }
            let value = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .ok_or_else(|| ArgsError::MissingValue(name.clone()))?,
            };
            match name.as_str() {
                "namespace" => a.namespace = value,
                "id" => a.id = value,
                "address" => a.address = value,
                "publish-binary" => a.publish_binary = value,
                "bundle" => a.bundle = value,
                "socket" => a.socket = value,
                _ => return Err(ArgsError::Unknown(name)),
            }
        }
        a.action = action.unwrap_or(Action::Serve);
        if !matches!(a.action, Action::Version | Action::Info) {
            if a.namespace.is_empty() {
                return Err(ArgsError::Required("namespace"));
            }
            if a.id.is_empty() {
                return Err(ArgsError::Required("id"));
            }
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, ArgsError> {
        Args::parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn containerd_start_command_line() {
        let a = parse("-namespace default -address /run/containerd/containerd.sock -publish-binary /usr/bin/containerd -id c1 -debug start").unwrap();
        assert_eq!(a.action, Action::Start);
        assert_eq!((a.namespace.as_str(), a.id.as_str()), ("default", "c1"));
        assert_eq!(a.address, "/run/containerd/containerd.sock");
        assert!(a.debug);
    }

    #[test]
    fn delete_with_bundle_and_inline_values() {
        let a = parse("-namespace=k8s.io -id=c2 -bundle /b delete").unwrap();
        assert_eq!(a.action, Action::Delete);
        assert_eq!(a.bundle, "/b");
        assert!(!a.debug);
    }

    #[test]
    fn serve_by_default_and_errors_named() {
        assert_eq!(
            parse("-namespace n -id i -socket unix:///s")
                .unwrap()
                .action,
            Action::Serve
        );
        assert_eq!(parse("-id i"), Err(ArgsError::Required("namespace")));
        assert_eq!(
            parse("-namespace n -id"),
            Err(ArgsError::MissingValue("id".into()))
        );
        assert_eq!(
            parse("-namespace n -id i -colour x"),
            Err(ArgsError::Unknown("colour".into()))
        );
        assert_eq!(
            parse("-namespace n -id i start stop"),
            Err(ArgsError::Extra("stop".into()))
        );
        assert_eq!(parse("-v").unwrap().action, Action::Version);
        // containerd 2.x runs the binary with `-info` alone.
        assert_eq!(parse("-info").unwrap().action, Action::Info);
    }
}
