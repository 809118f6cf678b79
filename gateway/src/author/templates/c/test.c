/* Unit tests, run natively: ./build.sh test */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "standalone.h"

/* In the component, the linker provides this; natively, nothing needs it. */
void __component_type_object_force_link_standalone(void) {}

static int failures;
#define CHECK(condition)                                                   \
    do {                                                                   \
        if (!(condition)) {                                                \
            fprintf(stderr, "%s:%d: failed: %s\n", __FILE__, __LINE__, #condition); \
            failures++;                                                    \
        }                                                                  \
    } while (0)

/* The inputs the gateway would pass: one FP32 tensor `x`, allocated as the
 * bindings allocate (infer frees them). */
static standalone_list_tensor_t input_x(const float *values, size_t count) {
    standalone_list_tensor_t inputs = {calloc(1, sizeof(standalone_tensor_t)), 1};
    standalone_tensor_t *x = &inputs.ptr[0];
    standalone_string_dup(&x->name, "x");
    x->datatype = GATEWAY_PLUGIN_TYPES_DATATYPE_FP32;
    x->shape.len = 1;
    x->shape.ptr = malloc(sizeof(int64_t));
    x->shape.ptr[0] = (int64_t)count;
    x->data.len = count * sizeof(float);
    x->data.ptr = malloc(x->data.len);
    memcpy(x->data.ptr, values, x->data.len);
    return inputs;
}

static void doubles(void) {
    const float values[2] = {1.0f, -2.5f};
    standalone_list_tensor_t inputs = input_x(values, 2), outputs;
    standalone_error_t err;
    if (!exports_standalone_infer(&inputs, &outputs, &err)) {
        CHECK(!"infer refused its input");
        standalone_error_free(&err);
        return;
    }
    CHECK(outputs.len == 1 && outputs.ptr[0].name.len == 1 && outputs.ptr[0].name.ptr[0] == 'y');
    float y[2];
    CHECK(outputs.ptr[0].data.len == sizeof y);
    memcpy(y, outputs.ptr[0].data.ptr, sizeof y);
    CHECK(y[0] == 2.0f && y[1] == -5.0f);
    standalone_list_tensor_free(&outputs);
}

static void names_what_is_missing(void) {
    standalone_list_tensor_t inputs = {NULL, 0}, outputs;
    standalone_error_t err;
    CHECK(!exports_standalone_infer(&inputs, &outputs, &err));
    CHECK(err.tag == GATEWAY_PLUGIN_TYPES_ERROR_INVALID_INPUT);
    const standalone_string_t *message = &err.val.invalid_input;
    const char *expected = "missing input `x`";
    CHECK(message->len == strlen(expected) && memcmp(message->ptr, expected, message->len) == 0);
    standalone_error_free(&err);
}

int main(void) {
    doubles();
    names_what_is_missing();
    if (failures) return 1;
    printf("2 tests passed\n");
    return 0;
}
