#!/usr/bin/env python3
"""Traffic and ground truth for the time-to-merge example.

Sends synthetic pull requests (the distribution the trained v2 was fitted
on, tests/fixtures/onnx/generate.py) to the gateway, each with a request id
and a routing key of its own, then reports how long each really took to
merge: POST /v2/models/time-to-merge/feedback with the true buckets, in
batches, a few seconds after the answers (truth comes later).

    python3 examples/ground_truth.py [--url http://127.0.0.1:8080] [--requests 2000]

Standard library only.
"""

import argparse
import json
import math
import random
import time
import urllib.error
import urllib.request

BUCKETS = ["within_hour", "within_day", "within_week", "within_month", "longer"]


def geometric(rng, p):
    return float(max(1, math.ceil(math.log(1.0 - rng.random()) / math.log(1.0 - p))))


def poisson(rng, lam):
    limit, k, product = math.exp(-lam), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return float(k)


def pull_request(rng):
    """One synthetic PR's six features and its true bucket."""
    files = geometric(rng, 0.25)
    additions = math.floor(rng.lognormvariate(3.2, 1.6) * math.sqrt(files))
    deletions = math.floor(additions * rng.betavariate(1.2, 3.0))
    commits = geometric(rng, 0.35)
    comments = poisson(rng, 0.8 + 0.002 * min(max(additions + deletions, 0), 2000))
    reviews = poisson(rng, 1.0)
    log_hours = (
        -1.0
        + 0.55 * math.log1p(additions + deletions)
        + 0.25 * math.log1p(files)
        + 0.35 * comments
        + 0.1 * commits
        - 0.45 * reviews
        + rng.gauss(0.0, 0.6)
    )
    bucket = sum(log_hours >= edge for edge in (0.0, math.log(24.0), math.log(168.0), math.log(720.0)))
    return [files, additions, deletions, commits, comments, reviews], BUCKETS[bucket]


def post(url, body, headers=None):
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="time-to-merge")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--truth-delay", type=float, default=2.0, help="seconds between an answer and its truth")
    parser.add_argument("--rate", type=float, default=100.0, help="requests a second")
    parser.add_argument("--token", default=None, help="the feedback token, if the gateway has one")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    pending, served, failed, counts = [], {}, {}, {}
    auth = {"authorization": f"Bearer {args.token}"} if args.token else {}
    for i in range(args.requests):
        features, truth = pull_request(rng)
        request_id = f"pr-{args.seed}-{i}"
        try:
            answer = post(
                f"{args.url}/v2/models/{args.model}/infer",
                {"inputs": [{"name": "pr_features", "datatype": "FP32", "shape": [1, 6], "data": features}]},
                {"x-request-id": request_id, "x-routing-key": f"author-{rng.randrange(1_000_000)}"},
            )
            version = answer["model_version"]
            served[version] = served.get(version, 0) + 1
            pending.append((time.monotonic(), request_id, truth))
        except urllib.error.HTTPError as error:
            # Refused or failed: no answer to judge.
            failed[error.code] = failed.get(error.code, 0) + 1
        due = [p for p in pending if time.monotonic() - p[0] >= args.truth_delay]
        if len(due) >= 50 or (i == args.requests - 1):
            if i == args.requests - 1:
                time.sleep(args.truth_delay)
                due = pending
            if not due:
                continue
            reply = post(
                f"{args.url}/v2/models/{args.model}/feedback",
                {"feedback": [{"request_id": r, "label": t} for _, r, t in due]},
                auth,
            )
            for outcome, n in reply.items():
                counts[outcome] = counts.get(outcome, 0) + n
            pending = [p for p in pending if p not in due]
        time.sleep(1.0 / args.rate)
    print(json.dumps({"answered_by": served, "failed": failed, "feedback": counts}, sort_keys=True))


if __name__ == "__main__":
    main()
