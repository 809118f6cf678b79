// Time to merge, version 1 (size rules), in JavaScript: the same answers as
// the Rust `ttm-rules-v1` on every input. Built against the `standalone`
// world of the gateway's WIT with componentize-js (SpiderMonkey, see
// build.sh) or componentize-qjs (QuickJS, see ../ttm-rules-qjs/build.sh).
//
// The bucket follows the size of the change (lines added plus deleted, and
// files touched); a long discussion (20 comments or more) pushes it one
// bucket later. The predicted bucket gets probability 0.7, every other one
// 0.075.

// A WIT `s64`: componentize-js passes it as a BigInt, componentize-qjs as a
// Number (its build script replaces this line).
const s64 = (n) => BigInt(n);

const INPUT = "pr_features";
const FEATURES = ["files_changed", "additions", "deletions", "commits", "comments", "review_count"];
const BUCKETS = ["within_hour", "within_day", "within_week", "within_month", "longer"];

function sizeBucket(files, additions, deletions) {
  const lines = Math.fround(additions + deletions);
  if (lines <= 20 && files <= 2) return 0;
  if (lines <= 200) return 1;
  if (lines <= 1000) return 2;
  if (lines <= 5000) return 3;
  return 4;
}

function bucket(row) {
  const bySize = sizeBucket(row[0], row[1], row[2]);
  return row[4] >= 20 ? Math.min(bySize + 1, 4) : bySize;
}

// A rejected input: the gateway answers 400 with the message.
function invalid(message) {
  return { tag: "invalid-input", val: message };
}

// A float as Rust prints an f32 (`-3`, `0.5`, `1000000000000000000000000000000`,
// `0.00000000015`, `inf`, `NaN`): the shortest digits that read back as the
// same f32, written out without an exponent, so every version's messages
// are the same.
function rustFloat(value) {
  if (Number.isNaN(value)) return "NaN";
  if (!Number.isFinite(value)) return value > 0 ? "inf" : "-inf";
  if (value === 0) return Object.is(value, -0) ? "-0" : "0";
  const sign = value < 0 ? "-" : "";
  const [digits, exponent] = shortestDigits(Math.abs(value));
  const text = String(digits).replace(/0+$/, "");
  const power = exponent + String(digits).length - text.length;
  if (power >= 0) return sign + text + "0".repeat(power);
  const point = text.length + power;
  if (point > 0) return sign + text.slice(0, point) + "." + text.slice(point);
  return sign + "0." + "0".repeat(-point) + text;
}

// The digits and the power of ten of their last one: the shortest decimal
// that reads back as this f32. The correctly rounded decimal of each
// length is tried, and its neighbours: where the gap to the next f32 down
// is narrower than the gap up (at powers of two), a neighbour can read
// back where the rounded one does not.
function shortestDigits(magnitude) {
  for (let precision = 0; precision < 9; precision++) {
    const [mantissa, exponent] = magnitude.toExponential(precision).split("e");
    const nearest = Number(mantissa.replace(".", ""));
    const power = Number(exponent) - precision;
    let best = null;
    for (const d of [nearest, nearest - 1, nearest + 1]) {
      const candidate = Number(`${d}e${power}`);
      if (d > 0 && Math.fround(candidate) === magnitude) {
        const distance = Math.abs(candidate - magnitude);
        // The closest; halfway between two, the larger (as Rust does).
        if (best === null || distance < best[0] || (distance === best[0] && d > best[1])) {
          best = [distance, d];
        }
      }
    }
    if (best !== null) return [best[1], power];
  }
  const [mantissa, exponent] = magnitude.toExponential(8).split("e");
  return [Number(mantissa.replace(".", "")), Number(exponent) - 8];
}

export function info() {
  return {
    name: "ttm-rules",
    version: "1.0.0",
    description: "time-to-merge bucket from change size and discussion length (JavaScript)",
    inputs: [{ name: INPUT, datatype: "fp32", shape: [s64(-1), s64(6)] }],
    outputs: [
      { name: "label", datatype: "bytes", shape: [s64(-1)] },
      { name: "probabilities", datatype: "fp32", shape: [s64(-1), s64(5)] },
    ],
  };
}

export function infer(inputs) {
  const tensor = inputs.find((t) => t.name === INPUT);
  if (tensor === undefined) throw invalid(`missing input \`${INPUT}\``);
  if (tensor.datatype !== "fp32") {
    const name = tensor.datatype[0].toUpperCase() + tensor.datatype.slice(1);
    throw invalid(`input \`${INPUT}\`: expected datatype Fp32, got ${name}`);
  }
  const shape = Array.from(tensor.shape, Number);
  if (shape.length !== 2 || shape[0] < 0 || shape[1] !== 6) {
    throw invalid(`input \`${INPUT}\`: expected shape [N, 6], got [${shape.join(", ")}]`);
  }
  const rows = shape[0];
  const data = tensor.data;
  const values = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const probabilities = new DataView(new ArrayBuffer(rows * 5 * 4));
  const labels = [];
  let labelBytes = 0;
  for (let r = 0; r < rows; r++) {
    const row = [];
    for (let f = 0; f < 6; f++) {
      const value = values.getFloat32((r * 6 + f) * 4, true);
      if (!Number.isFinite(value) || value < 0) {
        throw invalid(
          `${INPUT}[${r}] feature \`${FEATURES[f]}\` is ${rustFloat(value)}; counts must be finite and >= 0`,
        );
      }
      row.push(value);
    }
    const best = bucket(row);
    for (let b = 0; b < 5; b++) {
      probabilities.setFloat32((r * 5 + b) * 4, b === best ? 0.7 : 0.075, true);
    }
    // ASCII (QuickJS has no TextEncoder).
    const label = Uint8Array.from(BUCKETS[best], (c) => c.charCodeAt(0));
    labels.push(label);
    labelBytes += 4 + label.length;
  }
  const labelData = new Uint8Array(labelBytes);
  const lengths = new DataView(labelData.buffer);
  let at = 0;
  for (const label of labels) {
    lengths.setUint32(at, label.length, true);
    labelData.set(label, at + 4);
    at += 4 + label.length;
  }
  return [
    { name: "label", datatype: "bytes", shape: [s64(rows)], data: labelData },
    {
      name: "probabilities",
      datatype: "fp32",
      shape: [s64(rows), s64(5)],
      data: new Uint8Array(probabilities.buffer),
    },
  ];
}
