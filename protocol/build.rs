//! Generates the Rust bindings of the agent API with ttrpc-codegen (pure Rust; no `protoc`).

use std::{fs, io, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTOS: &[&str] = &["protos/agent.proto"];

fn main() -> io::Result<()> {
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(io::Error::other)?);
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    Codegen::new()
        .out_dir(&out)
        .inputs(PROTOS)
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()?;
    // The generated files start with inner attributes (`#![allow(...)]`) and inner doc comments, which
    // `include!` cannot take; drop them (lib.rs carries the allows instead).
    for entry in fs::read_dir(&out)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path)?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("#![") && !l.starts_with("//!"))
                .collect();
            fs::write(&path, kept.join("\n"))?;
        }
    }
    Ok(())
}
