"""Resolve credentials the way any boto3 program in a pod does, and report what it got.

Run with AWS_CONTAINER_CREDENTIALS_FULL_URI and AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE set and
every other credential source disabled. Prints one JSON line; secrets only as SHA-256 digests.
"""
import hashlib
import json
import sys

import boto3

session = boto3.Session()
creds = session.get_credentials()
if creds is None:
    print(json.dumps({"error": "no credentials"}))
    sys.exit(1)
frozen = creds.get_frozen_credentials()
print(json.dumps({
    "method": creds.method,
    "access_key": frozen.access_key,
    "secret_sha256": hashlib.sha256(frozen.secret_key.encode()).hexdigest(),
    "token_sha256": hashlib.sha256((frozen.token or "").encode()).hexdigest(),
    "expiry": str(getattr(creds, "_expiry_time", "")),
}))
