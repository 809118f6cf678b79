#!/bin/sh
# Builds ttm-rules-c.wasm (tens of KB) from app.c:
#   1. wit-bindgen c writes the bindings of the gateway's `standalone` world;
#   2. clang compiles for wasm32-wasi against wasi-libc;
#   3. wasm-component-ld (it ships with rustc, for Rust's wasm32-wasip2
#      target) links and wraps the module into a component with the WASI
#      preview-1 adapter.
# Needs: wit-bindgen (cargo install wit-bindgen-cli@0.61.1 --no-default-features
# --features c), clang and wasm-ld with a wasm32 wasi-libc (Debian: clang-19,
# lld-19, wasi-libc, libclang-rt-19-dev-wasm32), and a Rust toolchain from
# rustup (for wasm-component-ld). WIT_BINDGEN, CLANG and WASM_COMPONENT_LD name the commands
# where they are not found on their own.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/ttm-rules-c.wasm}

first() { for c in "$@"; do command -v "$c" >/dev/null 2>&1 && { command -v "$c"; return; }; done; echo "none of: $*" >&2; return 1; }
wit_bindgen=${WIT_BINDGEN:-$(first wit-bindgen)}
clang=${CLANG:-$(first clang-19 clang)}
component_ld=${WASM_COMPONENT_LD:-$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/wasm-component-ld 2>/dev/null | head -n 1)}
[ -x "$component_ld" ] || { echo "wasm-component-ld not found: it ships with rustc (rustup), in $(rustc --print sysroot)/lib/rustlib/*/bin" >&2; exit 1; }

gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
"$wit_bindgen" c --world standalone "$here/../../../wit" --out-dir "$gen" >"$gen/log" 2>&1 || { cat "$gen/log" >&2; exit 1; }
# Warnings are errors in app.c, not in the generated bindings.
"$clang" --target=wasm32-wasi -O2 -Wall -Wextra -Werror -I "$gen" -c "$here/app.c" -o "$gen/app.o"
"$clang" --target=wasm32-wasi -O2 -I "$gen" -c "$gen/standalone.c" -o "$gen/standalone.o"
"$clang" --target=wasm32-wasi -mexec-model=reactor -O2 \
  "$gen/app.o" "$gen/standalone.o" "$gen/standalone_component_type.o" \
  -fuse-ld="$component_ld" -Wl,--wasi-adapter=reactor \
  -o "$out"
