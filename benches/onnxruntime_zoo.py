#!/usr/bin/env python3
"""onnxruntime's side of benches/onnx_zoo.rs: times every zoo model through
onnxruntime's Python API on the same rows and prints one JSON object,
{model: {"1": ns_per_call, "36": ns_per_call}} (median of repeated runs).

Needs onnxruntime (`python3 -m pip install onnxruntime==1.32.0`); the Rust
benchmark runs this script when it can and reports tract alone when not.
Usage: python3 benches/onnxruntime_zoo.py MODEL_DIR REPEATS
"""

import json
import pathlib
import sys
import time

import numpy as np
import onnxruntime as ort


def per_call_ns(sess, feed, repeats):
    # Calibrate to ~20 ms per sample, then take the median of `repeats`.
    n = 1
    while True:
        start = time.perf_counter_ns()
        for _ in range(n):
            sess.run(None, feed)
        elapsed = time.perf_counter_ns() - start
        if elapsed > 20_000_000 or n > 1_000_000:
            break
        n *= 2
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(n):
            sess.run(None, feed)
        samples.append((time.perf_counter_ns() - start) / n)
    samples.sort()
    return samples[len(samples) // 2]


def main():
    directory = pathlib.Path(sys.argv[1])
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    reference = json.loads((directory / "reference.json").read_text())
    rows = np.array(reference["rows"], dtype=np.float32)
    options = ort.SessionOptions()
    # One thread, as the gateway runs one model call on one thread.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    results = {}
    for name in sys.argv[3:] or sorted(reference["models"]):
        path = directory / f"{name}.onnx"
        if not path.exists():
            continue
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        results[name] = {
            "1": per_call_ns(sess, {"pr_features": rows[:1]}, repeats),
            str(len(rows)): per_call_ns(sess, {"pr_features": rows}, repeats),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
