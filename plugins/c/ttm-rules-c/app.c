/* Time to merge, version 1 (size rules), in C: the same answers as the Rust
 * `ttm-rules-v1` on every input. Built with clang for wasm32-wasi against
 * wasi-libc, with bindings from `wit-bindgen c` for the `standalone` world
 * of the gateway's WIT, linked into a component by wasm-component-ld (see
 * build.sh).
 *
 * The bucket follows the size of the change (lines added plus deleted, and
 * files touched); a long discussion (20 comments or more) pushes it one
 * bucket later. The predicted bucket gets probability 0.7, every other one
 * 0.075.
 *
 * Ownership, as wit-bindgen's C bindings define it: `infer` owns its inputs
 * (and frees them); everything returned is allocated with malloc and freed
 * by the bindings once the gateway has copied it out. */

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "standalone.h"

#define INPUT "pr_features"
#define N_FEATURES 6
#define N_BUCKETS 5

static const char *const FEATURES[N_FEATURES] = {
    "files_changed", "additions", "deletions", "commits", "comments", "review_count",
};
static const char *const BUCKETS[N_BUCKETS] = {
    "within_hour", "within_day", "within_week", "within_month", "longer",
};
static const char *const DATATYPES[] = {
    "Bool", "Int8", "Int16", "Int32", "Int64", "Uint8",
    "Uint16", "Uint32", "Uint64", "Fp32", "Fp64", "Bytes",
};

static int size_bucket(float files, float additions, float deletions) {
    float lines = additions + deletions;
    if (lines <= 20.0f && files <= 2.0f) return 0;
    if (lines <= 200.0f) return 1;
    if (lines <= 1000.0f) return 2;
    if (lines <= 5000.0f) return 3;
    return 4;
}

static int bucket(const float *row) {
    int by_size = size_bucket(row[0], row[1], row[2]);
    if (row[4] >= 20.0f) return by_size + 1 < 4 ? by_size + 1 : 4;
    return by_size;
}

/* The digits and the power of ten of their last one: the shortest decimal
 * that reads back as this f32. The correctly rounded decimal of each length
 * is tried, and its neighbours: where the gap to the next f32 down is
 * narrower than the gap up (at powers of two), a neighbour can read back
 * where the rounded one does not. */
static void shortest_digits(double magnitude, long long *digits, int *power) {
    char text[48];
    for (int precision = 0; precision < 9; precision++) {
        snprintf(text, sizeof text, "%.*e", precision, magnitude);
        char *e = strchr(text, 'e');
        long long nearest = 0;
        for (const char *c = text; c < e; c++)
            if (*c != '.') nearest = nearest * 10 + (*c - '0');
        int p = atoi(e + 1) - precision;
        long long best = 0;
        double best_distance = 0;
        for (int step = 0; step < 3; step++) {
            long long d = nearest + (step == 0 ? 0 : step == 1 ? -1 : 1);
            char candidate[48];
            snprintf(candidate, sizeof candidate, "%llde%d", d, p);
            double value = strtod(candidate, NULL);
            if (d > 0 && (float)value == (float)magnitude) {
                double distance = fabs(value - magnitude);
                /* The closest; halfway between two, the larger (as Rust does). */
                if (best == 0 || distance < best_distance ||
                    (distance == best_distance && d > best)) {
                    best = d;
                    best_distance = distance;
                }
            }
        }
        if (best) {
            *digits = best;
            *power = p;
            return;
        }
    }
    snprintf(text, sizeof text, "%.8e", magnitude);
    char *e = strchr(text, 'e');
    *digits = 0;
    for (const char *c = text; c < e; c++)
        if (*c != '.') *digits = *digits * 10 + (*c - '0');
    *power = atoi(e + 1) - 8;
}

/* A float as Rust prints an f32 (`-3`, `0.5`, `1000000000000000000000000000000`,
 * `0.00000000015`, `inf`, `NaN`): the fewest digits that read back as the
 * same f32 (the closest such if several), written out without an exponent,
 * so every version's messages are the same. `size` is at least 64: an f32
 * needs at most 48 characters. */
static void rust_float(char *out, size_t size, float value) {
    if (isnan(value)) { snprintf(out, size, "NaN"); return; }
    if (isinf(value)) { snprintf(out, size, value > 0 ? "inf" : "-inf"); return; }
    if (value == 0.0f) { snprintf(out, size, signbit(value) ? "-0" : "0"); return; }
    long long number;
    int power;
    shortest_digits(fabs((double)value), &number, &power);
    while (number % 10 == 0) {
        number /= 10;
        power++;
    }
    char digits[24];
    int n = snprintf(digits, sizeof digits, "%lld", number);

    size_t at = 0;
#define PUT(ch) do { if (at + 1 < size) out[at++] = (ch); } while (0)
    if (value < 0) PUT('-');
    if (power >= 0) {
        for (int i = 0; i < n; i++) PUT(digits[i]);
        for (int i = 0; i < power; i++) PUT('0');
    } else if (n + power > 0) {
        for (int i = 0; i < n; i++) {
            if (i == n + power) PUT('.');
            PUT(digits[i]);
        }
    } else {
        PUT('0');
        PUT('.');
        for (int i = 0; i < -(n + power); i++) PUT('0');
        for (int i = 0; i < n; i++) PUT(digits[i]);
    }
#undef PUT
    out[at] = '\0';
}

/* Memory the guest cannot get is a trap (the gateway answers 500 and names
 * the plugin's memory limit), never a write through a null pointer, which
 * wasm would let through. */
static void *must(void *p) {
    if (!p) abort();
    return p;
}

static void dup_string(standalone_string_t *s, const char *text) {
    standalone_string_dup(s, text);
}

static void spec(gateway_plugin_types_tensor_spec_t *spec, const char *name,
                 gateway_plugin_types_datatype_t datatype, int64_t rows, int64_t columns) {
    dup_string(&spec->name, name);
    spec->datatype = datatype;
    spec->shape.len = columns ? 2 : 1;
    spec->shape.ptr = must(malloc(spec->shape.len * sizeof(int64_t)));
    spec->shape.ptr[0] = rows;
    if (columns) spec->shape.ptr[1] = columns;
}

void exports_standalone_info(standalone_model_info_t *ret) {
    dup_string(&ret->name, "ttm-rules");
    dup_string(&ret->version, "1.0.0");
    dup_string(&ret->description,
               "time-to-merge bucket from change size and discussion length (C)");
    ret->inputs.len = 1;
    ret->inputs.ptr = must(malloc(sizeof(gateway_plugin_types_tensor_spec_t)));
    spec(&ret->inputs.ptr[0], INPUT, GATEWAY_PLUGIN_TYPES_DATATYPE_FP32, -1, N_FEATURES);
    ret->outputs.len = 2;
    ret->outputs.ptr = must(malloc(2 * sizeof(gateway_plugin_types_tensor_spec_t)));
    spec(&ret->outputs.ptr[0], "label", GATEWAY_PLUGIN_TYPES_DATATYPE_BYTES, -1, 0);
    spec(&ret->outputs.ptr[1], "probabilities", GATEWAY_PLUGIN_TYPES_DATATYPE_FP32, -1, N_BUCKETS);
}

/* Refuses the input with a formatted message; returns false for `infer`. */
static bool invalid(standalone_error_t *err, const char *format, ...) {
    char message[512];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    err->tag = GATEWAY_PLUGIN_TYPES_ERROR_INVALID_INPUT;
    dup_string(&err->val.invalid_input, message);
    return false;
}

/* The shape as Rust's `{:?}` prints a list: `[2, 5]`. */
static void shape_text(char *out, size_t size, const standalone_list_s64_t *shape) {
    size_t used = (size_t)snprintf(out, size, "[");
    for (size_t i = 0; i < shape->len && used < size; i++)
        used += (size_t)snprintf(out + used, size - used, "%s%lld", i ? ", " : "",
                                 (long long)shape->ptr[i]);
    if (used < size) snprintf(out + used, size - used, "]");
}

static bool infer(const standalone_list_tensor_t *inputs, standalone_list_tensor_t *ret,
                  standalone_error_t *err) {
    const standalone_tensor_t *tensor = NULL;
    for (size_t i = 0; i < inputs->len; i++) {
        const standalone_string_t *name = &inputs->ptr[i].name;
        if (name->len == strlen(INPUT) && memcmp(name->ptr, INPUT, name->len) == 0) {
            tensor = &inputs->ptr[i];
            break;
        }
    }
    if (!tensor) return invalid(err, "missing input `" INPUT "`");
    if (tensor->datatype != GATEWAY_PLUGIN_TYPES_DATATYPE_FP32)
        return invalid(err, "input `" INPUT "`: expected datatype Fp32, got %s",
                       tensor->datatype < 12 ? DATATYPES[tensor->datatype] : "?");
    const standalone_list_s64_t *shape = &tensor->shape;
    if (shape->len != 2 || shape->ptr[0] < 0 || shape->ptr[1] != N_FEATURES) {
        char text[256];
        shape_text(text, sizeof text, shape);
        return invalid(err, "input `" INPUT "`: expected shape [N, 6], got %s", text);
    }
    /* Compared by division first: size_t is 32 bits here. */
    const size_t row_bytes = N_FEATURES * sizeof(float);
    if ((uint64_t)shape->ptr[0] > tensor->data.len / row_bytes ||
        tensor->data.len != (size_t)shape->ptr[0] * row_bytes)
        return invalid(err, "input `" INPUT "`: %zu bytes for %lld rows", tensor->data.len,
                       (long long)shape->ptr[0]);
    size_t rows = (size_t)shape->ptr[0];

    /* Labels: each a little-endian u32 length and the text. */
    size_t label_bytes = 0;
    float *probabilities = must(malloc(rows * N_BUCKETS * sizeof(float) + 1));
    uint8_t *best = must(malloc(rows + 1));
    for (size_t r = 0; r < rows; r++) {
        float row[N_FEATURES];
        memcpy(row, tensor->data.ptr + r * sizeof row, sizeof row);
        for (int f = 0; f < N_FEATURES; f++) {
            if (!isfinite(row[f]) || row[f] < 0.0f) {
                char value[64];
                rust_float(value, sizeof value, row[f]);
                free(probabilities);
                free(best);
                return invalid(err,
                               INPUT "[%zu] feature `%s` is %s; counts must be finite and >= 0",
                               r, FEATURES[f], value);
            }
        }
        best[r] = (uint8_t)bucket(row);
        for (int b = 0; b < N_BUCKETS; b++)
            probabilities[r * N_BUCKETS + b] = b == best[r] ? 0.7f : 0.075f;
        label_bytes += 4 + strlen(BUCKETS[best[r]]);
    }
    uint8_t *labels = must(malloc(label_bytes + 1));
    size_t at = 0;
    for (size_t r = 0; r < rows; r++) {
        uint32_t len = (uint32_t)strlen(BUCKETS[best[r]]);
        memcpy(labels + at, &len, 4); /* wasm is little-endian */
        memcpy(labels + at + 4, BUCKETS[best[r]], len);
        at += 4 + len;
    }
    free(best);

    /* The bindings free a list only when it is not empty. */
    if (rows == 0) {
        free(labels);
        free(probabilities);
        labels = NULL;
        probabilities = NULL;
    }
    ret->len = 2;
    ret->ptr = must(malloc(2 * sizeof(standalone_tensor_t)));
    standalone_tensor_t *label = &ret->ptr[0], *probs = &ret->ptr[1];
    dup_string(&label->name, "label");
    label->datatype = GATEWAY_PLUGIN_TYPES_DATATYPE_BYTES;
    label->shape.len = 1;
    label->shape.ptr = must(malloc(sizeof(int64_t)));
    label->shape.ptr[0] = (int64_t)rows;
    label->data.ptr = labels;
    label->data.len = label_bytes;
    dup_string(&probs->name, "probabilities");
    probs->datatype = GATEWAY_PLUGIN_TYPES_DATATYPE_FP32;
    probs->shape.len = 2;
    probs->shape.ptr = must(malloc(2 * sizeof(int64_t)));
    probs->shape.ptr[0] = (int64_t)rows;
    probs->shape.ptr[1] = N_BUCKETS;
    probs->data.ptr = (uint8_t *)probabilities;
    probs->data.len = rows * N_BUCKETS * sizeof(float);
    return true;
}

bool exports_standalone_infer(standalone_list_tensor_t *inputs, standalone_list_tensor_t *ret,
                              standalone_error_t *err) {
    bool ok = infer(inputs, ret, err);
    standalone_list_tensor_free(inputs);
    return ok;
}
