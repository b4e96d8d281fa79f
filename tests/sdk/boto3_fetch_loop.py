"""Ask for container credentials with botocore's own provider over and over, until a file appears.

Run with AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE set, and
PIA_STOP_FILE naming the file whose existence ends the run. Each ask is one HTTP request: the
provider's fetcher makes one attempt (botocore's default is three, one second apart, which would
hide a refused connection). Two threads ask at once: one with a new provider per ask (a new
connection each time, as pods' SDKs refresh hours apart), one that keeps its provider (and its
keep-alive connection). Prints one JSON line: counts, and the first errors (never a secret).
"""
import json
import os
import threading
import time

from botocore.credentials import ContainerProvider
from botocore.utils import ContainerMetadataFetcher

STOP = os.environ["PIA_STOP_FILE"]
# Whatever happens to the test that started it, this ends.
DEADLINE = time.monotonic() + 120
lock = threading.Lock()
counts = {"ok": 0, "failed": 0, "errors": []}


class OneAttempt(ContainerMetadataFetcher):
    RETRY_ATTEMPTS = 1


def provider():
    return ContainerProvider(fetcher=OneAttempt(sleep=lambda _: None))


def ask(fresh):
    kept = provider()
    while not os.path.exists(STOP) and time.monotonic() < DEADLINE:
        started = time.monotonic()
        try:
            creds = (provider() if fresh else kept).load()
            if creds is None or not creds.get_frozen_credentials().access_key.startswith("ASIA"):
                raise RuntimeError("no credentials")
            with lock:
                counts["ok"] += 1
        except Exception as e:  # noqa: BLE001 - every failure is counted, whatever it is
            with lock:
                counts["failed"] += 1
                if len(counts["errors"]) < 5:
                    took = time.monotonic() - started
                    counts["errors"].append(f"{'fresh' if fresh else 'kept'} after {took:.3f}s: {e!r}"[:300])
        time.sleep(0.005)


threads = [threading.Thread(target=ask, args=(fresh,)) for fresh in (True, False)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(counts))
