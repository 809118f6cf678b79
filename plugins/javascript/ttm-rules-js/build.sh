#!/bin/sh
# Builds ttm-rules-js.wasm (about 12 MB: SpiderMonkey and the app) from
# app.js. Needs Node.js and componentize-js
# (npm install @bytecodealliance/componentize-js@0.23.0); COMPONENTIZE_JS
# names its command if it is not on the PATH.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/ttm-rules-js.wasm}
${COMPONENTIZE_JS:-componentize-js} "$here/app.js" --wit "$here/../../../wit" \
  --world-name standalone -o "$out"
