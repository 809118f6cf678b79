//! `gateway plugin new NAME --lang L`: a project that builds, tests and
//! serves as it is, outside this repository. Its WIT files (and, for Rust,
//! the SDK) are copied from the ones this gateway was built with, so the
//! project and the gateway always agree on the interface.

use std::path::{Path, PathBuf};

/// The languages `plugin new` writes projects for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
}

const PLUGIN_WIT: &str = include_str!("../../../wit/plugin.wit");
const WASI_NN_WIT: &str = include_str!("../../../wit/deps/wasi-nn/wasi-nn.wit");
const SDK_LIB: &str = include_str!("../../../plugins/sdk/src/lib.rs");
const SDK_README: &str = include_str!("../../../plugins/sdk/README.md");

/// A plugin name that is also a valid crate, module and file name.
fn check_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a plugin name: lower-case letters, digits and `-`, starting with a letter, at most 64"
        ))
    }
}

/// Writes the project for plugin `name` in `dir` (which must not exist,
/// or be empty) and returns the files written.
pub fn new_project(name: &str, lang: Lang, dir: &Path) -> Result<Vec<PathBuf>, String> {
    check_name(name)?;
    if dir.exists()
        && std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .next()
            .is_some()
    {
        return Err(format!(
            "{} exists and is not empty; choose a new folder",
            dir.display()
        ));
    }
    let files = match lang {
        Lang::Rust => rust(name),
    };
    let mut written = Vec::new();
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The WIT folder every project carries.
fn wit(prefix: &str) -> Vec<(String, String)> {
    vec![
        (format!("{prefix}wit/plugin.wit"), PLUGIN_WIT.to_string()),
        (
            format!("{prefix}wit/deps/wasi-nn/wasi-nn.wit"),
            WASI_NN_WIT.to_string(),
        ),
    ]
}

fn rust(name: &str) -> Vec<(String, String)> {
    let file = name.replace('-', "_");
    let mut files = vec![
        (
            "Cargo.toml".into(),
            format!(
                r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# A component for the gateway (wasm32-wasip2), and a native library for `cargo test`.
crate-type = ["cdylib", "rlib"]

[dependencies]
gateway-plugin-sdk = {{ path = "sdk" }}

[profile.release]
opt-level = 3
lto = true
codegen-units = 1
strip = true
panic = "abort"

# A project of its own, even inside another workspace.
[workspace]
"#
            ),
        ),
        (
            "src/lib.rs".into(),
            format!(
                r#"//! The `{name}` plugin: doubles every value of its input `x`.
//! Replace `info` and `infer` with your model.

use gateway_plugin_sdk::{{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec}};

pub struct Plugin;

impl Guest for Plugin {{
    fn info() -> ModelInfo {{
        ModelInfo::new("{name}", env!("CARGO_PKG_VERSION"), "doubles every value")
            .input(TensorSpec::new("x", Datatype::Fp32, &[-1]))
            .output(TensorSpec::new("y", Datatype::Fp32, &[-1]))
    }}

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {{
        let x = gateway_plugin_sdk::input(&inputs, "x")?;
        let y: Vec<f32> = x.to_f32()?.iter().map(|v| v * 2.0).collect();
        Ok(vec![Tensor::fp32("y", &x.shape, &y)])
    }}
}}

gateway_plugin_sdk::export_model!(Plugin);

#[cfg(test)]
mod tests {{
    use super::*;

    #[test]
    fn doubles() {{
        let outputs = Plugin::infer(vec![Tensor::fp32("x", &[2], &[1.0, -2.5])]).unwrap();
        assert_eq!(outputs[0].to_f32().unwrap(), vec![2.0, -5.0]);
    }}

    #[test]
    fn names_what_is_missing() {{
        match Plugin::infer(vec![]) {{
            Err(Error::InvalidInput(message)) => assert!(message.contains("`x`")),
            other => panic!("{{other:?}}"),
        }}
    }}
}}
"#
            ),
        ),
        (
            format!("policies/{name}.toml"),
            format!(
                r#"# Serve with: gateway serve --policies policies
model = "{name}"
champion = "v1"

[versions.v1]
plugin = "../target/wasm32-wasip2/release/{file}.wasm"
"#
            ),
        ),
        (
            "README.md".into(),
            format!(
                r#"# {name}

A model plugin for the wasm-model-gateway, in Rust.

```sh
cargo test                                          # unit tests, natively
cargo build --release --target wasm32-wasip2        # the component: target/wasm32-wasip2/release/{file}.wasm
gateway plugin test target/wasm32-wasip2/release/{file}.wasm    # the conformance suite
gateway plugin run target/wasm32-wasip2/release/{file}.wasm --input request.json
gateway serve --policies policies                   # serve it on 127.0.0.1:8080
curl -d @request.json localhost:8080/v2/models/{name}/infer
```

`rustup target add wasm32-wasip2` once, if the target is missing.
`sdk/` is the gateway's Rust SDK and `sdk/wit/` the interface, as the
gateway that wrote this project was built with.
"#
            ),
        ),
        (
            "request.json".into(),
            r#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2,3]}]}
"#
            .into(),
        ),
        (".gitignore".into(), "/target\n".into()),
        (
            "sdk/Cargo.toml".into(),
            r#"[package]
name = "gateway-plugin-sdk"
description = "Helpers for writing model plugins for the gateway (WIT bindings, tensor helpers)"
version = "0.1.0"
edition = "2024"
license = "Apache-2.0"
readme = "README.md"

[dependencies]
wit-bindgen = { version = "0.61.1", default-features = false, features = ["macros", "realloc", "std"] }
"#
            .into(),
        ),
        (
            "sdk/src/lib.rs".into(),
            SDK_LIB.replace(r#"path: "../../wit","#, r#"path: "wit","#),
        ),
        ("sdk/README.md".into(), SDK_README.to_string()),
    ];
    files.extend(wit("sdk/"));
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_template_points_at_its_own_wit() {
        // The vendored SDK must not reach back into this repository.
        assert!(SDK_LIB.contains(r#"path: "../../wit","#));
        let files = rust("demo-plugin");
        let lib = &files.iter().find(|(p, _)| p == "sdk/src/lib.rs").unwrap().1;
        assert!(lib.contains(r#"path: "wit","#) && !lib.contains("../../wit"));
        let policy = &files
            .iter()
            .find(|(p, _)| p == "policies/demo-plugin.toml")
            .unwrap()
            .1;
        assert!(policy.contains("release/demo_plugin.wasm"), "{policy}");
    }

    #[test]
    fn names_and_folders_are_checked() {
        assert!(check_name("Bad_Name").is_err());
        assert!(check_name("9lives").is_err());
        assert!(check_name("ttm-rules-v4").is_ok());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x"), "").unwrap();
        let e = new_project("p", Lang::Rust, dir.path()).unwrap_err();
        assert!(e.contains("not empty"), "{e}");
    }
}
