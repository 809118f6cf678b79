#!/bin/sh
# Builds ttm-rules-js.wasm (about 12 MB: SpiderMonkey and the app) from
# app.js. Needs Node.js and componentize-js
# (npm ci in ../toolchain, or npm install
# @bytecodealliance/componentize-js@0.23.0 @bytecodealliance/preview2-shim@0.25.0:
# componentize-js imports preview2-shim without declaring it); COMPONENTIZE_JS
# names its command if it is not on the PATH.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/ttm-rules-js.wasm}
"${COMPONENTIZE_JS:-componentize-js}" "$here/app.js" --wit "$here/../../../wit" \
  --world-name standalone -o "$out"
