//! Support for the confidential-storage tests and the demo: the root hash
//! the shim gives an image (computed with the shim's own image store, as a
//! security officer would for the image policy), a private containerd whose
//! `veil-sim` handler attests to a real broker that releases a disk key and
//! an image policy ([`Confidential`]), and a byte search over the host-side
//! disk files.

use std::{
    io::Read,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use veil_shim::{config::Config, rootfs::Layers, sandbox::LaunchInfo};

use crate::{
    containerd::Containerd,
    kbs::{Broker, KbsSetup},
    oci, Artefacts,
};

/// The broker path of the scratch disk's key.
pub const DISK: &str = "default/key/disk";
/// The broker path of the image policy.
pub const IMAGES: &str = "default/policy/images";
/// The resources a confidential pod fetches (name, path).
pub const RESOURCES: &[(&str, &str)] = &[("disk-key", DISK), ("image-policy", IMAGES)];
/// The scratch disk size of the tests' pods, MiB.
pub const SCRATCH_MIB: u64 = 64;
/// The LUKS2 header magic at offset 0 of a scratch disk.
pub const LUKS_MAGIC: &[u8] = b"LUKS\xba\xbe";
/// The containerd namespace the storage tests and the demo use.
pub const NS: &str = "veil-test";

/// The broker's release policy: both resources to simulated pods whose
/// measurement is reference value `reference`.
pub fn release_policy(reference: &str) -> String {
    [DISK, IMAGES]
        .iter()
        .map(|p| {
            format!(
                "[[resource]]\npath = \"{p}\"\ntee = [\"veil-sim\"]\nreference_values = [\"{reference}\"]\nallow_simulated = true\n\n"
            )
        })
        .collect()
}

/// `n` random bytes.
pub fn random(n: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut v)?;
    Ok(v)
}

/// A private containerd with busybox imported and a broker set up: its
/// `veil-sim` handler attests to the broker and has a scratch disk.
pub struct Confidential {
    /// The artefacts.
    pub a: Artefacts,
    /// The containerd.
    pub c: Containerd,
    /// The broker's files.
    pub setup: KbsSetup,
    /// A temp dir for the test.
    pub work: tempfile::TempDir,
    busybox_tree: PathBuf,
}

impl Confidential {
    /// Starts containerd, imports busybox, makes the broker's keys.
    pub fn new() -> Result<Self> {
        let a = Artefacts::locate()?;
        let c = Containerd::start(&a)?;
        let work = tempfile::Builder::new()
            .prefix("veil-storage-test.")
            .tempdir()?;
        let (archive, busybox_tree) =
            oci::busybox_archive_with(work.path(), oci::BUSYBOX_IMAGE, &[])?;
        c.import(NS, &archive)?;
        let setup = KbsSetup::new(&a)?;
        Ok(Confidential {
            a,
            c,
            setup,
            work,
            busybox_tree,
        })
    }

    /// Points the `veil-sim` handler at the broker at `addr` (not measured).
    pub fn use_broker(&self, addr: &str) -> Result<()> {
        let lines = broker_handler_lines(&self.setup, addr, RESOURCES, SCRATCH_MIB);
        self.c.configure(&self.a, &[("veil-sim", &lines)])
    }

    /// Registers what the shim launches for `veil-sim` as reference value
    /// `name`, with the command line changed by `edit`; returns it.
    pub fn register(&self, name: &str, edit: impl FnOnce(&mut String)) -> Result<String> {
        self.use_broker("127.0.0.1:1")?;
        let mut launch = launch_of(&self.c.veil_settings()?, "veil-sim")?;
        edit(&mut launch.cmdline);
        self.setup.add_reference(name, &launch)
    }

    /// Stores the resources: a random disk key (returned) and an image
    /// policy allowing `root_hash` for busybox.
    pub fn resources(&self, root_hash: &str) -> Result<Vec<u8>> {
        self.resources_for(&[(oci::BUSYBOX_IMAGE, root_hash)])
    }

    /// Stores a random disk key (returned) and an image policy allowing
    /// `images` (name, root hash).
    pub fn resources_for(&self, images: &[(&str, &str)]) -> Result<Vec<u8>> {
        let key = random(32)?;
        self.setup.add_resource(DISK, &key)?;
        let map: serde_json::Map<String, serde_json::Value> = images
            .iter()
            .map(|(n, h)| (n.to_string(), serde_json::Value::from(*h)))
            .collect();
        let doc = serde_json::json!({ "images": map });
        self.setup
            .add_resource(IMAGES, &serde_json::to_vec(&doc)?)?;
        Ok(key)
    }

    /// Imports busybox and the pause image into CRI's namespace; returns the
    /// pause image's root hash as the shim builds it.
    pub fn import_for_cri(&self) -> Result<String> {
        let dir = self.work.path().join("cri");
        std::fs::create_dir_all(&dir)?;
        let (busybox, _) = oci::busybox_archive_with(&dir, oci::BUSYBOX_IMAGE, &[])?;
        self.c.import("k8s.io", &busybox)?;
        self.c.import("k8s.io", &oci::pause_archive(&dir)?)?;
        image_root_hash(
            &self.c.veil_settings()?,
            "veil-sim",
            &dir.join("pause-rootfs"),
        )
    }

    /// Starts the broker releasing to reference value `reference` and points
    /// the handler at it.
    pub fn start_broker(&self, reference: &str) -> Result<Broker> {
        self.setup.set_policy(&release_policy(reference))?;
        let b = self.setup.start()?;
        self.use_broker(&b.addr)?;
        Ok(b)
    }

    /// The root hash of the busybox image as the shim builds it.
    pub fn busybox_root_hash(&self) -> Result<String> {
        image_root_hash(&self.c.veil_settings()?, "veil-sim", &self.busybox_tree)
    }

    /// `ctr run` arguments up to the options (see [`run_args`]).
    pub fn run_args(&self, handler: &str, image_name: &str) -> Vec<String> {
        run_args(&self.c, handler, image_name)
    }
}

/// `ctr run` arguments up to the options: the veil runtime, `handler` of
/// `c`'s config, the image-name annotation the image policy keys on.
pub fn run_args(c: &Containerd, handler: &str, image_name: &str) -> Vec<String> {
    vec![
        "run".into(),
        "--runtime".into(),
        "io.containerd.veil.v2".into(),
        "--runtime-config-path".into(),
        c.runtime_config(handler),
        "--annotation".into(),
        format!("io.veil.image-name={image_name}"),
    ]
}

/// The scratch file of pod `id` on the host.
pub fn scratch_file(c: &Containerd, id: &str) -> PathBuf {
    veil_shim::storage::scratch::path(&c.scratch_dir, id)
}

/// The dm-verity root hash of the image the shim builds from the root
/// filesystem `tree` for `handler` of `config` (built in a temp dir with the
/// same tools and options, then dropped).
pub fn image_root_hash(config: &Config, handler: &str, tree: &Path) -> Result<String> {
    let h = config.handler(handler)?;
    let work = tempfile::Builder::new()
        .prefix("veil-test-image.")
        .tempdir()?;
    let mut store = veil_shim::sandbox::image_store(config, h);
    store.dir = work.path().join("images");
    let layers = Layers {
        lowers: vec![tree.to_path_buf()],
        upper: None,
    };
    let image = store.acquire(&layers, "root-hash", work.path())?;
    let info = image
        .verity
        .clone()
        .context("the shim built an image without a dm-verity record")?;
    store.release(&image.key, "root-hash")?;
    Ok(info.root_hash)
}

/// TOML lines for a `veil-sim` handler section that attests to `broker_addr`
/// with `setup`'s certificate and simulated CA, fetches `resources` (name,
/// `repo/type/tag`) and has a scratch disk of `scratch_mib`.
pub fn broker_handler_lines(
    setup: &KbsSetup,
    broker_addr: &str,
    resources: &[(&str, &str)],
    scratch_mib: u64,
) -> String {
    let res = resources
        .iter()
        .map(|(n, p)| format!("{n:?} = {p:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "kbs_address = {broker_addr:?}\nkbs_cert = {:?}\nsim_ca_dir = {:?}\nkbs_resources = {{ {res} }}\nscratch_disk_mib = {scratch_mib}\n",
        setup.cert_der().display().to_string(),
        setup.sim_ca().display().to_string(),
    )
}

/// What the shim launches for `handler` of the config at `path`: the input
/// of the simulated measurement, for the broker's reference values.
pub fn launch_of(config: &Config, handler: &str) -> Result<LaunchInfo> {
    Ok(veil_shim::sandbox::launch_info(config.handler(handler)?)?)
}

/// Offset of the first occurrence of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether the file at `path` contains `needle` (read whole; the scratch
/// files of the tests are small and sparse).
pub fn file_contains(path: &Path, needle: &[u8]) -> Result<bool> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(find(&data, needle).is_some())
}

/// A container of [`cri_policy`]: name, command, exec commands.
pub type PolicyContainer<'a> = (&'a str, Vec<String>, Vec<Vec<String>>);

/// A request policy (docs/policy.md) for a CRI pod of the test images: the
/// pause container, and per `(name, args, execs)` a busybox container with
/// that command, the CRI standard mounts plus `mounts`, and the exact exec
/// commands allowed in it.
pub fn cri_policy(
    pause_hash: &str,
    busybox_hash: &str,
    mounts: &[&str],
    containers: &[PolicyContainer<'_>],
) -> String {
    let list = |v: &[String]| serde_json::to_string(v).unwrap_or_default();
    let mut mounts: Vec<String> = mounts.iter().map(|s| s.to_string()).collect();
    mounts.extend(["/etc/hosts".to_string(), "/dev/termination-log".to_string()]);
    let mut doc = format!(
        "version = 1\n\n[[container]]\nname = \"pause\"\nroot_hash = [\"{pause_hash}\"]\nargs = [\"/pause\"]\nenv_names = [\"PATH\"]\n"
    );
    for (name, args, execs) in containers {
        doc.push_str(&format!(
            "\n[[container]]\nname = \"{name}\"\nroot_hash = [\"{busybox_hash}\"]\nargs = {}\nenv_names = [\"PATH\", \"HOSTNAME\"]\nmounts = {}\n",
            list(args),
            list(&mounts)
        ));
        for e in execs {
            doc.push_str(&format!("[[container.exec]]\nargs = {}\n", list(e)));
        }
    }
    doc
}
