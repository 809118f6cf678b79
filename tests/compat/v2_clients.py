"""Drives a running gateway with the V2 clients users already have.

Usage: python3 v2_clients.py http://127.0.0.1:PORT [MODEL [METRICS_URL]]

Expects the example time-to-merge policy (versions v1 and v2), served as
MODEL (default `time-to-merge`) by a gateway no one else is calling.
Exits non-zero, naming the failed check, if any client disagrees with the
gateway. Run by the integration test `compat::real_v2_clients`.
"""

import asyncio
import sys

import numpy as np

BASE = sys.argv[1].rstrip("/")
HOSTPORT = BASE.split("://", 1)[1]
MODEL = sys.argv[2] if len(sys.argv) > 2 else "time-to-merge"
# /metrics: on the admin listener when the gateway has one.
METRICS = sys.argv[3] if len(sys.argv) > 3 else f"{BASE}/metrics"
# files, additions, deletions, commits, comments, reviews: see api.rs
ROWS = np.array([[1, 10, 5, 1, 0, 1], [9, 600, 300, 5, 25, 2]], dtype=np.float32)
V1_LABELS = ["within_hour", "within_month"]


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def tritonclient_checks():
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=HOSTPORT)
    check(client.is_server_live(), "tritonclient is_server_live")
    check(client.is_server_ready(), "tritonclient is_server_ready")
    check(client.get_server_metadata()["name"] == "wasm-model-gateway", "tritonclient get_server_metadata")
    check(client.is_model_ready(MODEL), "tritonclient is_model_ready")
    check(client.is_model_ready(MODEL, model_version="v2"), "tritonclient is_model_ready version v2")
    check(not client.is_model_ready("no-such-model"), "tritonclient is_model_ready is false for an unknown model")
    meta = client.get_model_metadata(MODEL)
    check(meta["inputs"][0] == {"name": "pr_features", "datatype": "FP32", "shape": [-1, 6]}, "tritonclient get_model_metadata")

    features = triton.InferInput("pr_features", list(ROWS.shape), "FP32")
    features.set_data_from_numpy(ROWS, binary_data=False)
    outputs = [
        triton.InferRequestedOutput("label", binary_data=False),
        triton.InferRequestedOutput("probabilities", binary_data=False),
    ]
    result = client.infer(MODEL, [features], outputs=outputs, request_id="triton-1")
    response = result.get_response()
    check(response["model_version"] == "v1" and response["id"] == "triton-1", "tritonclient infer: version and id")
    labels = [l.decode() if isinstance(l, bytes) else l for l in result.as_numpy("label").tolist()]
    check(labels == V1_LABELS, f"tritonclient infer: labels {labels}")
    probabilities = result.as_numpy("probabilities")
    check(probabilities.shape == (2, 5) and np.allclose(probabilities.sum(axis=1), 1.0), "tritonclient infer: probabilities")

    pinned = client.infer(MODEL, [features], model_version="v2", outputs=outputs)
    check(pinned.get_response()["model_version"] == "v2", "tritonclient infer pinned to v2")

    # tritonclient's defaults: the binary tensor extension both ways.
    binary = triton.InferInput("pr_features", list(ROWS.shape), "FP32")
    binary.set_data_from_numpy(ROWS)
    result = client.infer(MODEL, [binary])
    labels = [l.decode() if isinstance(l, bytes) else l for l in result.as_numpy("label").tolist()]
    check(labels == V1_LABELS, f"tritonclient binary infer: labels {labels}")
    check(np.allclose(result.as_numpy("probabilities"), probabilities), "tritonclient binary infer: same probabilities as JSON")
    mixed = client.infer(MODEL, [binary], outputs=[triton.InferRequestedOutput("probabilities", binary_data=True),
                                                   triton.InferRequestedOutput("label", binary_data=False)])
    check(mixed.get_response()["outputs"][1]["data"] == V1_LABELS, "tritonclient mixed binary/JSON outputs")
    check(np.allclose(mixed.as_numpy("probabilities"), probabilities), "tritonclient binary output beside a JSON one")

    bad = triton.InferInput("pr_features", [1, 5], "FP32")
    bad.set_data_from_numpy(np.ones((1, 5), dtype=np.float32), binary_data=False)
    try:
        client.infer(MODEL, [bad], outputs=outputs)
        check(False, "tritonclient infer with a wrong shape raises")
    except InferenceServerException as e:
        check(e.status() == "400" and "the model expects [-1, 6]" in e.message(), f"tritonclient sees the 400 message: {e}")


async def kserve_checks():
    from kserve import InferenceRESTClient, InferInput, InferRequest
    from kserve.inference_client import RESTConfig

    client = InferenceRESTClient(config=RESTConfig(protocol="v2", retries=0))
    try:
        check(await client.is_server_live(BASE), "kserve is_server_live")
        check(await client.is_server_ready(BASE), "kserve is_server_ready")
        check(await client.is_model_ready(BASE, MODEL), "kserve is_model_ready")
        features = InferInput("pr_features", list(ROWS.shape), "FP32")
        features.set_data_from_numpy(ROWS, binary_data=False)
        request = InferRequest(model_name=MODEL, infer_inputs=[features], request_id="kserve-1")
        headers = {}
        response = await client.infer(BASE, request, model_name=MODEL, response_headers=headers)
        # kserve's client drops `model_version` from the body; the header has it.
        check(headers.get("x-model-version") == "v1" and response.id == "kserve-1", "kserve infer: version header and id")
        by_name = {o.name: o for o in response.outputs}
        labels = [l.decode() if isinstance(l, bytes) else l for l in by_name["label"].data]
        check(labels == V1_LABELS, f"kserve infer: labels {labels}")
        probabilities = by_name["probabilities"].as_numpy()
        check(probabilities.shape == (2, 5) and np.allclose(probabilities.sum(axis=1), 1.0), "kserve infer: probabilities")

        binary = InferInput("pr_features", list(ROWS.shape), "FP32")
        binary.set_data_from_numpy(ROWS, binary_data=True)
        response = await client.infer(BASE, InferRequest(model_name=MODEL, infer_inputs=[binary]), model_name=MODEL)
        by_name = {o.name: o for o in response.outputs}
        check(np.allclose(by_name["probabilities"].as_numpy(), probabilities), "kserve binary input: same answer")
    finally:
        await client.close()


def metrics_checks():
    """/metrics is valid Prometheus exposition and counts what the clients sent."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(METRICS).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    check("gateway_requests" in families and families["gateway_requests"].type == "counter", "metrics: requests counter parses")
    check(families["gateway_request_duration_seconds"].type == "histogram", "metrics: latency is a histogram")
    samples = [
        s for s in families["gateway_requests"].samples
        if s.name == "gateway_requests_total" and s.labels.get("model") == MODEL and s.labels.get("status") == "200"
    ]
    # tritonclient: 4 infers; kserve: 2.
    check(sum(s.value for s in samples) == 6, f"metrics: 6 successful requests counted, got {samples}")
    # The process series every Prometheus client library exports.
    rss = families["process_resident_memory_bytes"]
    check(rss.type == "gauge" and rss.samples[0].value > 1e6, f"metrics: resident memory, got {rss.samples}")
    cpu = families["process_cpu_seconds"]
    check(cpu.type == "counter" and cpu.samples[0].value > 0, f"metrics: CPU seconds, got {cpu.samples}")
    fds = families["process_open_fds"].samples[0].value
    check(0 < fds <= families["process_max_fds"].samples[0].value, f"metrics: open fds {fds}")


tritonclient_checks()
asyncio.run(kserve_checks())
metrics_checks()
print("all V2 client checks passed")
