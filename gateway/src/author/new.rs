//! `gateway plugin new NAME --lang L`: a project that builds, tests and
//! serves as it is, outside this repository. Its WIT files (and, for Rust,
//! the SDK) are copied from the ones this gateway was built with, so the
//! project and the gateway always agree on the interface.

use std::path::{Path, PathBuf};

/// The languages `plugin new` writes projects for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    #[value(name = "js")]
    JavaScript,
    C,
}

const PLUGIN_WIT: &str = include_str!("../../../wit/plugin.wit");
const WASI_NN_WIT: &str = include_str!("../../../wit/deps/wasi-nn/wasi-nn.wit");
const SDK_LIB: &str = include_str!("../../../plugins/sdk/src/lib.rs");
const SDK_README: &str = include_str!("../../../plugins/sdk/README.md");
const C_APP: &str = include_str!("templates/c/app.c");
const C_TEST: &str = include_str!("templates/c/test.c");
const C_BUILD: &str = include_str!("templates/c/build.sh");

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
        Lang::Python => python(name),
        Lang::JavaScript => javascript(name),
        Lang::C => c(name),
    };
    let mut written = Vec::new();
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        // A new file, never one that appeared meanwhile (or a link).
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut file| std::io::Write::write_all(&mut file, text.as_bytes()))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if text.starts_with("#!") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
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
        let y: Vec<f32> = x.view_f32()?.iter().map(|v| v * 2.0).collect();
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
        policy(name, &format!("target/wasm32-wasip2/release/{file}.wasm")),
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
            SDK_LIB.to_string(),
        ),
        ("sdk/README.md".into(), SDK_README.to_string()),
    ];
    files.extend(wit("sdk/"));
    files
}

/// The policy serving a component built next to it, at `../FILE`.
fn policy(name: &str, file: &str) -> (String, String) {
    (
        format!("policies/{name}.toml"),
        format!(
            r#"# Serve with: gateway serve --policies policies
model = "{name}"
champion = "v1"

[versions.v1]
plugin = "../{file}"
"#
        ),
    )
}

const REQUEST: &str = r#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2,3]}]}
"#;

fn readme(name: &str, lang: &str, steps: &str, wasm: &str) -> String {
    format!(
        r#"# {name}

A model plugin for the wasm-model-gateway, in {lang}.

```sh
{steps}
gateway plugin test {wasm}                      # the conformance suite
gateway plugin run {wasm} --input request.json
gateway serve --policies policies               # serve it on 127.0.0.1:8080
curl -d @request.json localhost:8080/v2/models/{name}/infer
```

`wit/` is the gateway's interface, as the gateway that wrote this project
was built with; the plugin targets its `standalone` world (no imports).
"#
    )
}

fn python(name: &str) -> Vec<(String, String)> {
    let wasm = format!("{name}.wasm");
    let mut files = vec![
        (
            "app.py".into(),
            format!(
                r#""""The `{name}` plugin: doubles every value of its input `x`.
Replace `info` and `infer` with your model."""

import struct

import wit_world
from componentize_py_types import Err
from wit_world.imports.types import Datatype, Error_InvalidInput, ModelInfo, Tensor, TensorSpec


class WitWorld(wit_world.WitWorld):
    def info(self) -> ModelInfo:
        return ModelInfo(
            name="{name}",
            version="0.1.0",
            description="doubles every value",
            inputs=[TensorSpec("x", Datatype.FP32, [-1])],
            outputs=[TensorSpec("y", Datatype.FP32, [-1])],
        )

    def infer(self, inputs):
        x = next((t for t in inputs if t.name == "x"), None)
        if x is None:
            raise Err(Error_InvalidInput("missing input `x`"))
        count = len(x.data) // 4
        values = struct.unpack(f"<{{count}}f", x.data)
        doubled = struct.pack(f"<{{count}}f", *(v * 2 for v in values))
        return [Tensor("y", Datatype.FP32, list(x.shape), doubled)]
"#
            ),
        ),
        (
            "test_app.py".into(),
            r#""""Unit tests, run natively: ./build.sh test"""

import struct
import unittest

from componentize_py_types import Err
from wit_world.imports.types import Datatype, Tensor

import app


class Doubles(unittest.TestCase):
    def test_doubles(self):
        x = Tensor("x", Datatype.FP32, [2], struct.pack("<2f", 1.0, -2.5))
        (y,) = app.WitWorld().infer([x])
        self.assertEqual(struct.unpack("<2f", y.data), (2.0, -5.0))

    def test_names_what_is_missing(self):
        with self.assertRaises(Err) as refused:
            app.WitWorld().infer([])
        self.assertIn("`x`", refused.exception.value.value)


if __name__ == "__main__":
    unittest.main()
"#
            .into(),
        ),
        (
            "build.sh".into(),
            format!(
                r#"#!/bin/sh
# ./build.sh       builds {wasm} (CPython and app.py, about 18 MB)
# ./build.sh test  runs the unit tests natively, with the generated bindings
# Needs componentize-py: python3 -m pip install componentize-py==0.25.1
set -eu
cd "$(dirname "$0")"
if [ "${{1:-}}" = test ]; then
  componentize-py -d wit -w standalone bindings bindings
  PYTHONPATH=bindings python3 -m unittest -v test_app
else
  componentize-py -d wit -w standalone componentize app -o {wasm}
fi
"#
            ),
        ),
    ];
    files.extend(built_by_script(
        name,
        "Python (componentize-py)",
        "__pycache__/\n",
    ));
    files
}

fn javascript(name: &str) -> Vec<(String, String)> {
    let wasm = format!("{name}.wasm");
    let mut files = vec![
        (
            "app.js".into(),
            format!(
                r#"// The `{name}` plugin: doubles every value of its input `x`.
// Replace `info` and `infer` with your model. Enums are strings, s64 is a
// BigInt, list<u8> a Uint8Array; throw {{ tag: "invalid-input", val: message }}
// to refuse an input (a 400).

export function info() {{
  return {{
    name: "{name}",
    version: "0.1.0",
    description: "doubles every value",
    inputs: [{{ name: "x", datatype: "fp32", shape: [-1n] }}],
    outputs: [{{ name: "y", datatype: "fp32", shape: [-1n] }}],
  }};
}}

export function infer(inputs) {{
  const x = inputs.find((t) => t.name === "x");
  if (x === undefined) throw {{ tag: "invalid-input", val: "missing input `x`" }};
  const values = new DataView(x.data.buffer, x.data.byteOffset, x.data.byteLength);
  const doubled = new DataView(new ArrayBuffer(x.data.byteLength));
  for (let i = 0; i < x.data.byteLength; i += 4) {{
    doubled.setFloat32(i, values.getFloat32(i, true) * 2, true);
  }}
  return [{{ name: "y", datatype: "fp32", shape: Array.from(x.shape), data: new Uint8Array(doubled.buffer) }}];
}}
"#
            ),
        ),
        (
            "app.test.js".into(),
            r#"// Unit tests, run natively: node --test
import { test } from "node:test";
import assert from "node:assert/strict";
import { infer } from "./app.js";

test("doubles", () => {
  const data = new Uint8Array(new Float32Array([1, -2.5]).buffer);
  const [y] = infer([{ name: "x", datatype: "fp32", shape: [2n], data }]);
  assert.deepEqual(Array.from(new Float32Array(y.data.buffer)), [2, -5]);
});

test("names what is missing", () => {
  assert.throws(() => infer([]), (e) => e.tag === "invalid-input" && e.val.includes("`x`"));
});
"#
            .into(),
        ),
        (
            "package.json".into(),
            format!(
                r#"{{
  "name": "{name}",
  "version": "0.1.0",
  "private": true,
  "type": "module",
  "scripts": {{
    "test": "node --test",
    "build": "componentize-js app.js --wit wit --world-name standalone -o {wasm}"
  }},
  "devDependencies": {{
    "@bytecodealliance/componentize-js": "0.23.0",
    "@bytecodealliance/preview2-shim": "0.25.0"
  }}
}}
"#
            ),
        ),
        policy(name, &wasm),
        (
            "README.md".into(),
            readme(
                name,
                "JavaScript (componentize-js)",
                &format!(
                    "npm install                                     # componentize-js
npm test                                        # unit tests, natively
npm run build                                   # the component: {wasm}"
                ),
                &wasm,
            ),
        ),
        ("request.json".into(), REQUEST.into()),
        (
            ".gitignore".into(),
            format!(
                "/{wasm}
/node_modules
"
            ),
        ),
    ];
    files.extend(wit(""));
    files
}

fn c(name: &str) -> Vec<(String, String)> {
    let named = |template: &str| template.replace("{{name}}", name);
    let mut files = vec![
        ("app.c".into(), named(C_APP)),
        ("test.c".into(), C_TEST.to_string()),
        ("build.sh".into(), named(C_BUILD)),
    ];
    files.extend(built_by_script(name, "C (wasi-libc, wit-bindgen)", ""));
    files
}

/// What a project built by its `build.sh` (which `./build.sh test` unit
/// tests) carries besides its sources: the policy, the README, a request,
/// `.gitignore` (the component, `bindings/`, and `ignore`) and the WIT.
fn built_by_script(name: &str, lang: &str, ignore: &str) -> Vec<(String, String)> {
    let wasm = format!("{name}.wasm");
    let mut files = vec![
        policy(name, &wasm),
        (
            "README.md".into(),
            readme(
                name,
                lang,
                &format!(
                    "./build.sh test                                 # unit tests, natively
./build.sh                                      # the component: {wasm}"
                ),
                &wasm,
            ),
        ),
        ("request.json".into(), REQUEST.into()),
        (".gitignore".into(), format!("/{wasm}\n/bindings\n{ignore}")),
    ];
    files.extend(wit(""));
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_template_points_at_its_own_wit() {
        // The SDK (here, and as packaged for crates.io) reads the WIT in
        // its own folder (`plugins/sdk/wit` links to this repository's);
        // the vendored copy carries it.
        assert!(SDK_LIB.contains(r#"path: "wit","#));
        let files = rust("demo-plugin");
        assert!(files.iter().any(|(p, _)| p == "sdk/wit/plugin.wit"));
        let policy = &files
            .iter()
            .find(|(p, _)| p == "policies/demo-plugin.toml")
            .unwrap()
            .1;
        assert!(policy.contains("release/demo_plugin.wasm"), "{policy}");
    }

    #[test]
    fn the_c_template_is_named() {
        let files = c("demo-plugin");
        for (path, text) in &files {
            assert!(!text.contains("{{name}}"), "{path}");
        }
        let file = |name: &str| &files.iter().find(|(p, _)| p == name).unwrap().1;
        assert!(file("app.c").contains(r#""demo-plugin""#));
        assert!(file("build.sh").contains("-o demo-plugin.wasm"));
        assert!(file("policies/demo-plugin.toml").contains(r#""../demo-plugin.wasm""#));
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
