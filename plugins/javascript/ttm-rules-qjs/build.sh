#!/bin/sh
# Builds ttm-rules-qjs.wasm (about 1.6 MB: QuickJS and the app) from
# ../ttm-rules-js/app.js, the same source as the SpiderMonkey build, with
# its one line that differs: componentize-qjs passes a WIT `s64` as a
# Number where componentize-js passes a BigInt.
# Needs componentize-qjs (npm ci in ../toolchain, or
# npm install componentize-qjs@0.4.5); COMPONENTIZE_QJS names its command if
# it is not on the PATH.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/ttm-rules-qjs.wasm}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed 's/^const s64 = (n) => BigInt(n);$/const s64 = (n) => n;/' "$here/../ttm-rules-js/app.js" > "$work/app.js"
grep -q '^const s64 = (n) => n;$' "$work/app.js" || { echo "app.js no longer has the s64 line" >&2; exit 1; }
"${COMPONENTIZE_QJS:-componentize-qjs}" --wit "$here/../../../wit" --world standalone --sync \
  --js "$work/app.js" -o "$out" >"$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }
