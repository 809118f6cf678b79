"""Time to merge, version 1 (size rules), in Python: the same answers as the
Rust `ttm-rules-v1` on every input. Built with componentize-py against the
`standalone` world of the gateway's WIT (see build.sh).

The bucket follows the size of the change (lines added plus deleted, and
files touched); a long discussion (20 comments or more) pushes it one bucket
later. The predicted bucket gets probability 0.7, every other one 0.075.
"""

import math
import struct

import wit_world
from componentize_py_types import Err
from wit_world.imports.types import (
    Datatype,
    Error_InvalidInput,
    ModelInfo,
    Tensor,
    TensorSpec,
)

INPUT = "pr_features"
FEATURES = ["files_changed", "additions", "deletions", "commits", "comments", "review_count"]
BUCKETS = ["within_hour", "within_day", "within_week", "within_month", "longer"]


def size_bucket(files, additions, deletions):
    lines = additions + deletions
    if lines <= 20.0 and files <= 2.0:
        return 0
    if lines <= 200.0:
        return 1
    if lines <= 1000.0:
        return 2
    if lines <= 5000.0:
        return 3
    return 4


def bucket(row):
    files, additions, deletions, _commits, comments, _reviews = row
    by_size = size_bucket(files, additions, deletions)
    return min(by_size + 1, 4) if comments >= 20.0 else by_size


def invalid(message):
    return Err(Error_InvalidInput(message))


class WitWorld(wit_world.WitWorld):
    def info(self) -> ModelInfo:
        return ModelInfo(
            name="ttm-rules",
            version="1.0.0",
            description="time-to-merge bucket from change size and discussion length (Python)",
            inputs=[TensorSpec(INPUT, Datatype.FP32, [-1, 6])],
            outputs=[
                TensorSpec("label", Datatype.BYTES, [-1]),
                TensorSpec("probabilities", Datatype.FP32, [-1, 5]),
            ],
        )

    def infer(self, inputs):
        tensor = next((t for t in inputs if t.name == INPUT), None)
        if tensor is None:
            raise invalid(f"missing input `{INPUT}`")
        if tensor.datatype != Datatype.FP32:
            raise invalid(f"input `{INPUT}`: expected datatype Fp32, got {tensor.datatype.name.title()}")
        if len(tensor.shape) != 2 or tensor.shape[0] < 0 or tensor.shape[1] != 6:
            raise invalid(f"input `{INPUT}`: expected shape [N, 6], got {list(tensor.shape)}")
        rows = tensor.shape[0]
        values = struct.unpack(f"<{rows * 6}f", tensor.data)
        labels = bytearray()
        probabilities = []
        for r in range(rows):
            row = values[r * 6:(r + 1) * 6]
            for value, feature in zip(row, FEATURES):
                if not math.isfinite(value) or value < 0.0:
                    raise invalid(
                        f"{INPUT}[{r}] feature `{feature}` is {rust_float(value)}; counts must be finite and >= 0"
                    )
            best = bucket(row)
            p = [0.075] * 5
            p[best] = 0.7
            probabilities.extend(p)
            label = BUCKETS[best].encode()
            labels += struct.pack("<I", len(label)) + label
        return [
            Tensor("label", Datatype.BYTES, [rows], bytes(labels)),
            Tensor("probabilities", Datatype.FP32, [rows, 5], struct.pack(f"<{rows * 5}f", *probabilities)),
        ]


def rust_float(value):
    """A float as Rust prints an f32 (`-3`, `0.5`, `1000000000000000000000000000000`,
    `0.00000000015`, `inf`, `NaN`): the fewest digits that read back as the
    same f32 (the closest such if several), written out without an
    exponent, so every version's messages are the same."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0.0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign = "-" if value < 0 else ""
    magnitude = abs(value)
    digits, exponent = shortest_digits(magnitude)
    text = str(digits).rstrip("0")
    exponent += len(str(digits)) - len(text)
    if exponent >= 0:
        return sign + text + "0" * exponent
    point = len(text) + exponent
    if point > 0:
        return sign + text[:point] + "." + text[point:]
    return sign + "0." + "0" * -point + text


def shortest_digits(magnitude):
    """The digits and the power of ten of their last one: the shortest
    decimal that reads back as this f32. The correctly rounded decimal of
    each length is tried, and its neighbours: where the gap to the next
    f32 down is narrower than the gap up (at powers of two), a neighbour
    can read back where the rounded one does not."""
    for precision in range(9):
        mantissa, exponent = f"{magnitude:.{precision}e}".split("e")
        nearest = int(mantissa.replace(".", ""))
        power = int(exponent) - precision
        fits = [
            (abs(float(f"{d}e{power}") - magnitude), -d)
            for d in (nearest, nearest - 1, nearest + 1)
            if d > 0 and as_f32(float(f"{d}e{power}")) == magnitude
        ]
        if fits:
            # The closest; halfway between two, the larger (as Rust does).
            return -min(fits)[1], power
    return int(f"{magnitude:.8e}".split("e")[0].replace(".", "")), int(f"{magnitude:.8e}".split("e")[1]) - 8


def as_f32(value):
    """The f32 nearest to a float; past the largest f32, infinity."""
    try:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return math.inf
