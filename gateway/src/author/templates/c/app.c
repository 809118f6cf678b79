/* The `{{name}}` plugin: doubles every value of its input `x`.
 * Replace exports_standalone_info and exports_standalone_infer with your
 * model.
 *
 * Ownership, as wit-bindgen's C bindings define it: `infer` owns its inputs
 * and frees them; everything returned is allocated with malloc and freed by
 * the bindings once the gateway has copied it out. */

#include <stdlib.h>
#include <string.h>

#include "standalone.h"

/* Memory the guest cannot get is a trap (the gateway answers 500 naming the
 * plugin's memory limit), never a write through a null pointer, which wasm
 * would let through. */
static void *must(void *p) {
    if (!p) abort();
    return p;
}

static void one_dimension(gateway_plugin_types_tensor_spec_t *spec, const char *name) {
    standalone_string_dup(&spec->name, name);
    spec->datatype = GATEWAY_PLUGIN_TYPES_DATATYPE_FP32;
    spec->shape.len = 1;
    spec->shape.ptr = must(malloc(sizeof(int64_t)));
    spec->shape.ptr[0] = -1; /* any length */
}

void exports_standalone_info(standalone_model_info_t *ret) {
    standalone_string_dup(&ret->name, "{{name}}");
    standalone_string_dup(&ret->version, "0.1.0");
    standalone_string_dup(&ret->description, "doubles every value");
    ret->inputs.len = 1;
    ret->inputs.ptr = must(calloc(1, sizeof *ret->inputs.ptr));
    one_dimension(&ret->inputs.ptr[0], "x");
    ret->outputs.len = 1;
    ret->outputs.ptr = must(calloc(1, sizeof *ret->outputs.ptr));
    one_dimension(&ret->outputs.ptr[0], "y");
}

bool exports_standalone_infer(standalone_list_tensor_t *inputs, standalone_list_tensor_t *ret,
                              standalone_error_t *err) {
    standalone_tensor_t *x = NULL;
    for (size_t i = 0; i < inputs->len; i++)
        if (inputs->ptr[i].name.len == 1 && inputs->ptr[i].name.ptr[0] == 'x') x = &inputs->ptr[i];
    if (!x) {
        err->tag = GATEWAY_PLUGIN_TYPES_ERROR_INVALID_INPUT;
        standalone_string_dup(&err->val.invalid_input, "missing input `x`");
        standalone_list_tensor_free(inputs);
        return false;
    }
    /* Doubled in place (the gateway has checked that the data holds the
     * shape's FP32 values); the output takes over the input's buffers. */
    for (size_t i = 0; i + sizeof(float) <= x->data.len; i += sizeof(float)) {
        float value;
        memcpy(&value, x->data.ptr + i, sizeof value);
        value *= 2.0f;
        memcpy(x->data.ptr + i, &value, sizeof value);
    }
    ret->len = 1;
    ret->ptr = must(malloc(sizeof *ret->ptr));
    ret->ptr[0] = *x;
    standalone_string_dup(&ret->ptr[0].name, "y");
    standalone_string_free(&x->name);
    memset(x, 0, sizeof *x); /* now owned by the output */
    standalone_list_tensor_free(inputs);
    return true;
}
