#!/bin/sh
# ./build.sh       builds {{name}}.wasm: bindings from `wit-bindgen c`, clang for
#                  wasm32-wasi with wasi-libc, and wasm-component-ld (it
#                  ships with rustc) to make the component
# ./build.sh test  runs the unit tests natively (cc)
# Needs: cargo install wit-bindgen-cli@0.61.1 --no-default-features --features c
#        apt-get install clang-19 lld-19 wasi-libc libclang-rt-19-dev-wasm32
#        a Rust toolchain from rustup (for wasm-component-ld)
# WIT_BINDGEN, CLANG and WASM_COMPONENT_LD name the commands where they are
# not found on their own; CC is the native compiler for the tests.
set -eu
cd "$(dirname "$0")"
first() {
  for c in "$@"; do command -v "$c" >/dev/null 2>&1 && { command -v "$c"; return; }; done
  echo "none of these is installed: $*" >&2
  return 1
}
wit_bindgen=${WIT_BINDGEN:-$(first wit-bindgen)}
"$wit_bindgen" c --world standalone wit --out-dir bindings >bindings.log 2>&1 || { cat bindings.log >&2; exit 1; }
rm -f bindings.log
if [ "${1:-}" = test ]; then
  ${CC:-cc} -std=c11 -O1 -Wall -Wextra -Werror -I bindings -c app.c -o bindings/app.o
  ${CC:-cc} -std=c11 -O1 -Wno-attributes -I bindings -c bindings/standalone.c -o bindings/standalone.o
  ${CC:-cc} -std=c11 -O1 -Wall -Wextra -Werror -I bindings test.c bindings/app.o bindings/standalone.o -o bindings/test
  bindings/test
else
  clang=${CLANG:-$(first clang-19 clang)}
  component_ld=${WASM_COMPONENT_LD:-$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/wasm-component-ld 2>/dev/null | head -n 1)}
  [ -x "$component_ld" ] || { echo "wasm-component-ld not found: it ships with rustc (rustup), in $(rustc --print sysroot)/lib/rustlib/*/bin" >&2; exit 1; }
  # Warnings are errors in app.c, not in the generated bindings.
  "$clang" --target=wasm32-wasi -O2 -Wall -Wextra -Werror -I bindings -c app.c -o bindings/app.wasm.o
  "$clang" --target=wasm32-wasi -O2 -I bindings -c bindings/standalone.c -o bindings/standalone.wasm.o
  "$clang" --target=wasm32-wasi -mexec-model=reactor -O2 \
    bindings/app.wasm.o bindings/standalone.wasm.o bindings/standalone_component_type.o \
    -fuse-ld="$component_ld" -Wl,--wasi-adapter=reactor -o {{name}}.wasm
fi
