//! Builds the example and test plugins in `../plugins` as wasm32-wasip2
//! components, as part of the gateway's normal build, and writes
//! `$OUT_DIR/plugins.rs` naming where they are.
//!
//! The nested `cargo build` uses a target directory inside `OUT_DIR`, so it
//! never contends for the outer build's lock, and it joins the outer build's
//! jobserver (inherited through the environment), so the two share the cores.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let root = manifest_dir
        .parent()
        .expect("gateway/ has a parent")
        .to_path_buf();
    let plugins = root.join("plugins");
    // Cargo scans a registered folder recursively. Relative paths: cargo
    // resolves them against this package's root, so a target directory
    // shared by clones at different paths (as CI's is) never compares
    // against another clone's files.
    println!("cargo:rerun-if-changed=../plugins");
    println!("cargo:rerun-if-changed=../wit");

    check_target_installed();

    let target_dir = out_dir.join("plugins-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .arg("build")
        .arg("--release")
        .arg("--locked")
        .arg("--workspace")
        .arg(format!("--target={TARGET}"))
        .arg("--manifest-path")
        .arg(plugins.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target_dir)
        // The outer build's flags are for the host, not for wasm.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        // `cargo clippy` of the gateway must not lint (and rebuild) the
        // plugins; they are linted on their own (see .ci/run).
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CLIPPY_ARGS")
        .status()
        .expect("failed to run cargo for the plugins");
    if !status.success() {
        panic!(
            "building the plugins in {} failed (see the errors above)",
            plugins.display()
        );
    }

    // Publish every component under its crate name (`ttm-rules-v1.wasm`), the
    // name policies use.
    let built = target_dir.join(TARGET).join("release");
    let published = out_dir.join("plugins");
    fs::create_dir_all(&published).expect("create plugin directory");
    for entry in fs::read_dir(&built).expect("read plugin build directory") {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|e| e == "wasm") {
            let stem = path.file_stem().expect("file stem").to_string_lossy();
            let name = stem.replace('_', "-");
            fs::copy(&path, published.join(format!("{name}.wasm"))).expect("copy plugin");
        }
    }
    let mut code = String::new();
    writeln!(
        code,
        "/// Directory holding the plugins built from `plugins/` with this gateway."
    )
    .unwrap();
    writeln!(
        code,
        "pub const BUILT_PLUGIN_DIR: &str = {:?};",
        published.display().to_string()
    )
    .unwrap();
    fs::write(out_dir.join("plugins.rs"), code).expect("write plugins.rs");
}

/// Fails early, with the fix, when the wasm target is missing: otherwise the
/// nested build fails with "can't find crate for `core`".
fn check_target_installed() {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok());
    if let Some(sysroot) = sysroot {
        let lib = Path::new(sysroot.trim()).join("lib/rustlib").join(TARGET);
        if !lib.exists() {
            panic!(
                "the {TARGET} Rust target is not installed; the plugins need it.\n\
                 Install it with:  rustup target add {TARGET}"
            );
        }
    }
}
