//! containerd on the node: its version, and the block of its config that
//! registers the veil runtimes.
//!
//! The block is appended to containerd's own config file between two marker
//! lines, right after the operator's last byte, so removing it gives back
//! the file byte for byte. Its table names follow the file's config version:
//! `version = 2` (containerd 1.6 and 1.7) puts runtimes under the CRI plugin
//! `io.containerd.grpc.v1.cri`, `version = 3` (containerd 2.x) under
//! `io.containerd.cri.v1.runtime`. A file without a `version` gets the one
//! the node's containerd reads natively.

use std::path::Path;

/// containerd's config, as the host names it.
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

/// First line of the block.
pub const BEGIN: &str =
    "# >>> veil: added by veil-node install; `veil-node uninstall` removes it >>>";
/// Last line of the block.
pub const END: &str = "# <<< veil <<<";

/// Errors about containerd's config.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// The config is not TOML.
    #[error("containerd config is not valid TOML")]
    Parse(#[source] toml::de::Error),
    /// The config with the block would not be valid TOML (the operator's
    /// config already defines one of the tables).
    #[error("containerd config with the veil runtimes is not valid TOML (does it already define a veil runtime?)")]
    Conflict(#[source] toml::de::Error),
    /// A config version veil does not write.
    #[error("containerd config version {0} is not supported (2 or 3)")]
    Version(i64),
    /// `containerd --version` printed something else.
    #[error("cannot read containerd's version from {0:?}")]
    VersionOutput(String),
    /// The begin marker without the end marker.
    #[error("containerd config has the veil begin marker but no end marker")]
    Unterminated,
}

/// A containerd release, `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
}

impl Version {
    /// From `containerd --version`'s output
    /// (`containerd github.com/containerd/containerd 1.6.20~ds1 <rev>`,
    /// `containerd containerd.io v2.0.0 <rev>`).
    pub fn parse(output: &str) -> Result<Self, ContainerdError> {
        let bad = || ContainerdError::VersionOutput(output.trim().to_string());
        let word = output.split_whitespace().nth(2).ok_or_else(bad)?;
        let mut parts = word.trim_start_matches('v').split(['.', '-', '~', '+']);
        let mut num = || {
            parts
                .next()
                .and_then(|p| p.parse::<u32>().ok())
                .ok_or_else(bad)
        };
        Ok(Version {
            major: num()?,
            minor: num()?,
        })
    }

    /// The config version this containerd reads natively.
    pub fn config_version(self) -> i64 {
        if self.major >= 2 {
            3
        } else {
            2
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One runtime to register: the handler and what its options point at.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// CRI handler (RuntimeClass handler).
    pub handler: String,
    /// The shim binary, as the host names it.
    pub shim: String,
    /// The veil config file, as the host names it.
    pub veil_config: String,
}

/// The block registering `runtimes` for config `version`; `with_version`
/// puts the `version` key in it (for a file that has no content of its own).
pub fn block(
    version: i64,
    with_version: bool,
    runtimes: &[Runtime],
) -> Result<String, ContainerdError> {
    let plugin = match version {
        2 => "io.containerd.grpc.v1.cri\".containerd",
        3 => "io.containerd.cri.v1.runtime\".containerd",
        v => return Err(ContainerdError::Version(v)),
    };
    let mut s = format!("\n{BEGIN}\n");
    if with_version {
        s.push_str(&format!("version = {version}\n"));
    }
    for r in runtimes {
        let t = format!("plugins.\"{plugin}.runtimes.{}", r.handler);
        s.push_str(&format!(
            "[{t}]\n  runtime_type = \"io.containerd.veil.v2\"\n  pod_annotations = [\"io.veil.*\"]\n  runtime_path = {:?}\n  [{t}.options]\n    ConfigPath = {:?}\n",
            r.shim,
            format!("{}#{}", r.veil_config, r.handler)
        ));
    }
    s.push_str(END);
    s.push('\n');
    Ok(s)
}

/// `text` without the veil block (exactly what was there before it was
/// added), and whether there was one.
pub fn strip(text: &str) -> Result<(String, bool), ContainerdError> {
    let marker = format!("\n{BEGIN}\n");
    let Some(start) = text.find(&marker) else {
        return Ok((text.to_string(), false));
    };
    let end_line = format!("{END}\n");
    let after = &text[start + marker.len()..];
    let end = after.find(&end_line).ok_or(ContainerdError::Unterminated)?;
    let rest = &after[end + end_line.len()..];
    Ok((format!("{}{rest}", &text[..start]), true))
}

/// The config version of `text` (`None`: the file names none).
pub fn file_version(text: &str) -> Result<Option<i64>, ContainerdError> {
    let t: toml::Table = text.parse().map_err(ContainerdError::Parse)?;
    Ok(t.get("version").and_then(|v| v.as_integer()))
}

/// containerd's config with the block for `runtimes` (replacing an older
/// block): `original` is the file without any block (`None`: no file),
/// `native` the config version of the node's containerd.
pub fn with_block(
    original: Option<&str>,
    native: i64,
    runtimes: &[Runtime],
) -> Result<String, ContainerdError> {
    let base = original.unwrap_or("");
    // A file with keys but no `version` is read as version 1, which veil
    // does not write; one with nothing but comments gets the native version.
    let parsed: toml::Table = base.parse().map_err(ContainerdError::Parse)?;
    let (version, own_version) = match file_version(base)? {
        Some(v) => (v, false),
        None if parsed.is_empty() => (native, true),
        None => return Err(ContainerdError::Version(1)),
    };
    let text = format!("{base}{}", block(version, own_version, runtimes)?);
    text.parse::<toml::Table>()
        .map_err(ContainerdError::Conflict)?;
    Ok(text)
}

/// Whether `text` registers the veil runtime type at all (by veil-node or
/// by hand).
pub fn registers_veil(text: &str) -> bool {
    text.contains("io.containerd.veil.v2")
}

/// Reads containerd's config at `path`, `None` when there is none.
pub fn read_config(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(h: &str) -> Runtime {
        Runtime {
            handler: h.into(),
            shim: "/opt/veil/bin/containerd-shim-veil-v2".into(),
            veil_config: "/etc/veil/config.toml".into(),
        }
    }

    #[test]
    fn versions_from_containerd_output() {
        let v = Version::parse(
            "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n",
        )
        .unwrap();
        assert_eq!((v, v.config_version()), (Version { major: 1, minor: 6 }, 2));
        let v =
            Version::parse("containerd github.com/containerd/containerd/v2 v2.3.0 abc").unwrap();
        assert_eq!((v.major, v.config_version()), (2, 3));
        assert!(Version::parse("garbage").is_err());
    }

    #[test]
    fn block_added_and_stripped_byte_for_byte() {
        // No trailing newline, comments, a CRI table the block extends.
        let original = "version = 2\n# operator's comment\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"";
        let with = with_block(Some(original), 3, &[rt("veil"), rt("veil-sim")]).unwrap();
        let t: toml::Table = with.parse().unwrap();
        let cri = &t["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
        assert_eq!(cri["snapshotter"].as_str(), Some("overlayfs"));
        let sim = &cri["runtimes"]["veil-sim"];
        assert_eq!(sim["runtime_type"].as_str(), Some("io.containerd.veil.v2"));
        assert_eq!(
            sim["options"]["ConfigPath"].as_str(),
            Some("/etc/veil/config.toml#veil-sim")
        );
        assert_eq!(strip(&with).unwrap(), (original.to_string(), true));
        // Replacing the block (upgrade) keeps the operator's part.
        let (base, _) = strip(&with).unwrap();
        let again = with_block(Some(&base), 2, &[rt("veil")]).unwrap();
        assert_eq!(strip(&again).unwrap().0, original);
        // Something the operator appended after the block stays.
        let appended = format!("{with}# later\n");
        assert_eq!(strip(&appended).unwrap().0, format!("{original}# later\n"));
    }

    #[test]
    fn version_3_tables_and_missing_file() {
        let with = with_block(None, 3, &[rt("veil")]).unwrap();
        let t: toml::Table = with.parse().unwrap();
        assert_eq!(t["version"].as_integer(), Some(3));
        assert!(
            t["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]
                .get("veil")
                .is_some()
        );
        assert_eq!(strip(&with).unwrap().0, "");
        // A file of comments only comes back as it was, too.
        let with = with_block(Some("# empty\n"), 2, &[rt("veil")]).unwrap();
        assert_eq!(
            with.parse::<toml::Table>().unwrap()["version"].as_integer(),
            Some(2)
        );
        assert_eq!(strip(&with).unwrap().0, "# empty\n");
    }

    #[test]
    fn conflicts_and_version_1_refused() {
        let mine = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.veil]\n  runtime_type = \"x\"\n";
        assert!(matches!(
            with_block(Some(mine), 2, &[rt("veil")]),
            Err(ContainerdError::Conflict(_))
        ));
        assert!(matches!(
            with_block(Some("root = \"/x\"\n"), 2, &[rt("veil")]),
            Err(ContainerdError::Version(1))
        ));
        assert!(matches!(
            strip(&format!("a = 1\n\n{BEGIN}\n")),
            Err(ContainerdError::Unterminated)
        ));
    }
}
