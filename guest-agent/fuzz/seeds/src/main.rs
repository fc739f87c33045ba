//! Writes seed corpora for the fuzz targets into `<workspace>/corpus/<target>/`
//! (`guest-agent/fuzz`, `attestation/fuzz`), each made by veil's own code — a
//! LUKS2 header from the agent's own `format`, verity parameters the agent
//! accepts, image policies it parses, SNP reports and TDX quotes the parsers
//! take — so that each fuzzer starts from inputs that reach deep into its
//! parser. Every seed is checked against its parser first.
//!
//! usage: cargo run --manifest-path guest-agent/fuzz/Cargo.toml -p veil-agent-fuzz-seeds [-- REPO]
//!
//! The LUKS2 seeds carry a fresh random volume key, salts and UUID on every
//! run: regenerate them when the header format changes, not in CI.

use std::{fs, path::Path};

use anyhow::{bail, Context, Result};
use protobuf::Message;
use veil_agent::disk::{
    luks2::{self, Limits, Luks2Error},
    verity::Verity,
    ImagePolicy,
};
use veil_attestation::evidence::{
    self,
    snp::{guid, layout, CertEntry, CertTable, SnpReport, REPORT_LEN, SIG_ALGO_ECDSA_P384_SHA384},
    tdx::{TdxQuote, ATT_KEY_ECDSA_P256, HEADER_LEN, TD10_BODY_LEN, TEE_TYPE_TDX},
};
use veil_protocol::agent::{AddStorageRequest, StorageSource, VerityParams};

/// The passphrase `fuzz_targets/luks2_header.rs` unlocks with.
const PASSPHRASE: &[u8] = b"veil-fuzz-passphrase";

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
    let d = dir.join(target);
    fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    let f = d.join(name);
    fs::write(&f, bytes).with_context(|| format!("cannot write {}", f.display()))
}

/// Both header copies of a disk the agent formats, without the keyslot
/// material (the harness reads zeros there, so unlocking goes through the
/// keyslot and digest checks and ends in a wrong key). The flag byte in front
/// tells the harness whether to re-seal the checksums after mutation.
fn luks2_seeds(dir: &Path) -> Result<()> {
    let disk = tempfile::tempfile().context("cannot create a temporary disk")?;
    let size = luks2::DATA_OFFSET + (1 << 20);
    disk.set_len(size)
        .context("cannot size the temporary disk")?;
    luks2::format(&disk, size, PASSPHRASE, 4096).context("format")?;
    let mut headers = vec![0u8; 2 * luks2::HDR_SIZE as usize];
    std::os::unix::fs::FileExt::read_exact_at(&disk, &mut headers, 0)
        .context("cannot read the header back")?;
    luks2::unlock(&disk, PASSPHRASE, &Limits::default()).context("the formatted disk")?;
    match luks2::unlock(&headers[..], PASSPHRASE, &Limits::default()) {
        Err(Luks2Error::Io(..)) => {}
        other => bail!("the headers alone should fail at the keyslot read, not {other:?}"),
    }
    for (flag, name) in [(1u8, "format-sealed"), (0u8, "format-raw")] {
        let mut seed = vec![flag];
        seed.extend_from_slice(&headers);
        write(dir, "luks2_header", name, &seed)?;
    }
    Ok(())
}

fn verity_seeds(dir: &Path) -> Result<()> {
    let mut sha256 = VerityParams::new();
    sha256.root_hash = "5e".repeat(32);
    sha256.hash_offset = 64 * 4096;
    sha256.salt = "00ff".repeat(8);
    let mut sha512 = sha256.clone();
    sha512.hash_algorithm = "sha512".into();
    sha512.root_hash = "a1".repeat(64);
    sha512.data_block_size = 512;
    sha512.hash_block_size = 1024;
    sha512.salt.clear();
    for (name, params) in [
        ("sha256-defaults", &sha256),
        ("sha512-small-blocks", &sha512),
    ] {
        Verity::from_request(params).with_context(|| format!("verity seed {name}"))?;
        write(dir, "verity_params", name, &params.write_to_bytes()?)?;
    }
    // The same parameters inside the request that carries them.
    let mut req = AddStorageRequest::new();
    req.storage_id = "image-1".into();
    req.source = StorageSource::BLOCK_SERIAL.into();
    req.locator = "veil-img-1".into();
    req.fstype = "erofs".into();
    req.read_only = true;
    req.verity = Some(sha256).into();
    write(
        dir,
        "api_messages",
        "add-storage-verity",
        &req.write_to_bytes()?,
    )
}

fn policy_seeds(dir: &Path) -> Result<()> {
    let doc = serde_json::json!({"images": {
        "docker.io/library/busybox:1.36": "5e".repeat(32),
        format!("registry.example/app@sha256:{}", "0c".repeat(32)):
            ["AB".repeat(32), "cd".repeat(64)],
    }})
    .to_string();
    for (name, doc) in [("two-images", doc.as_str()), ("empty", r#"{"images": {}}"#)] {
        ImagePolicy::parse(doc.as_bytes()).with_context(|| format!("policy seed {name}"))?;
        write(dir, "image_policy", name, doc.as_bytes())?;
    }
    Ok(())
}

/// An SNP-layout report, a certificate table, a v4 TDX quote (zero
/// signatures: they parse, they would not verify), raw and in Trustee's
/// evidence JSON.
fn evidence_seeds(dir: &Path) -> Result<()> {
    let mut report = vec![0u8; REPORT_LEN];
    report[layout::VERSION..layout::VERSION + 4].copy_from_slice(&3u32.to_le_bytes());
    report[layout::SIG_ALGO..layout::SIG_ALGO + 4]
        .copy_from_slice(&SIG_ALGO_ECDSA_P384_SHA384.to_le_bytes());
    // CPUID family 0x19 model 0x01 (Milan), at 0x188/0x189 in a version 3 report.
    report[0x188] = 0x19;
    report[0x189] = 0x01;
    SnpReport::parse(&report).context("SNP report seed")?;
    let entry = |g: &str, data: &[u8]| CertEntry {
        guid: g.into(),
        data: data.to_vec(),
    };
    let table = CertTable {
        entries: vec![
            entry(guid::VCEK, b"a VCEK certificate would be here"),
            entry(guid::ASK, &[0x30; 16]),
        ],
    }
    .encode();
    CertTable::parse(&table).context("certificate table seed")?;
    let mut quote = vec![0u8; HEADER_LEN + TD10_BODY_LEN];
    quote[0..2].copy_from_slice(&4u16.to_le_bytes());
    quote[2..4].copy_from_slice(&ATT_KEY_ECDSA_P256.to_le_bytes());
    quote[4..8].copy_from_slice(&TEE_TYPE_TDX.to_le_bytes());
    let sig_len: u32 = 64 + 64 + 384 + 64 + 2 + 6;
    quote.extend_from_slice(&sig_len.to_le_bytes());
    quote.resize(quote.len() + sig_len as usize, 0);
    TdxQuote::parse(&quote).context("TDX quote seed")?;
    write(dir, "snp_report", "report-v3", &report)?;
    write(dir, "snp_report", "cert-table", &table)?;
    write(dir, "tdx_quote", "quote-v4", &quote)?;
    let snp = evidence::snp_evidence_json(&report, Some(&table)).context("SNP evidence")?;
    let tdx = evidence::tdx_evidence_json(&quote, None);
    write(dir, "sim_evidence", "snp", snp.to_string().as_bytes())?;
    write(dir, "sim_evidence", "tdx", tdx.to_string().as_bytes())
}

fn main() -> Result<()> {
    let repo = match std::env::args_os().nth(1) {
        Some(d) => d.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.."),
    };
    let agent = repo.join("guest-agent/fuzz/corpus");
    let attestation = repo.join("attestation/fuzz/corpus");
    luks2_seeds(&agent)?;
    verity_seeds(&agent)?;
    policy_seeds(&agent)?;
    evidence_seeds(&attestation)?;
    println!(
        "seed corpora written to {} and {}",
        agent.display(),
        attestation.display()
    );
    Ok(())
}
