"""Drives a gateway over TLS and HTTP/2 with the clients users have.

Usage: python3 tls_clients.py HTTPS_HOSTPORT CA_FILE H2C_HOSTPORT MODEL

HTTPS_HOSTPORT serves TLS with a certificate for `localhost` signed by
CA_FILE; H2C_HOSTPORT serves cleartext (HTTP/2 by prior knowledge).
Exits non-zero, naming the failed check. Run by the integration test
`front::python_clients_over_tls_and_http2`.
"""

import ssl
import sys

import httpx
import numpy as np
import tritonclient.http as triton

HTTPS, CA, H2C, MODEL = sys.argv[1:5]
FEATURES = np.array([[3, 40, 12, 4, 1, 2]], dtype=np.float32)


def check(ok, what):
    if not ok:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


# tritonclient over HTTPS, verifying the gateway's certificate.
client = triton.InferenceServerClient(
    HTTPS, ssl=True, ssl_context_factory=lambda: ssl.create_default_context(cafile=CA)
)
check(client.is_server_ready(), "tritonclient over TLS: is_server_ready")
features = triton.InferInput("pr_features", list(FEATURES.shape), "FP32")
features.set_data_from_numpy(FEATURES)
result = client.infer(MODEL, [features])
check(result.as_numpy("label") is not None, "tritonclient over TLS: infer")

# A client that does not trust the CA is refused.
try:
    triton.InferenceServerClient(HTTPS, ssl=True).is_server_ready()
    check(False, "an untrusted certificate is refused by tritonclient")
except Exception:
    check(True, "an untrusted certificate is refused by tritonclient")

body = {"inputs": [{"name": "pr_features", "shape": [1, 6], "datatype": "FP32", "data": FEATURES.ravel().tolist()}]}

# httpx: HTTP/2 negotiated by ALPN over TLS.
with httpx.Client(http2=True, verify=ssl.create_default_context(cafile=CA)) as h2:
    reply = h2.post(f"https://{HTTPS}/v2/models/{MODEL}/infer", json=body)
    check(reply.status_code == 200, f"httpx over TLS: status {reply.status_code}")
    check(reply.http_version == "HTTP/2", f"httpx over TLS negotiated {reply.http_version}")
    check("outputs" in reply.json(), "httpx over TLS: outputs")

# httpx: HTTP/2 in cleartext by prior knowledge.
with httpx.Client(http1=False, http2=True) as h2c:
    reply = h2c.post(f"http://{H2C}/v2/models/{MODEL}/infer", json=body)
    check(reply.status_code == 200, f"httpx h2c: status {reply.status_code}")
    check(reply.http_version == "HTTP/2", f"httpx h2c spoke {reply.http_version}")
    bad = h2c.post(f"http://{H2C}/v2/models/{MODEL}/infer", content=b"{")
    check(bad.status_code == 400 and "error" in bad.json(), "httpx h2c: a bad body is a JSON 400")

print("all TLS and HTTP/2 checks passed")
