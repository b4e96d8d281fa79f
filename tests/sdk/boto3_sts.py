"""IRSA and role chaining through boto3's own credential providers, against the emulator.

CASES maps a name to {"env": {...}, "profile": name or null}. For each, boto3 builds a session
the way a program in a pod would (environment and AWS config file only) and asks STS who it is.
AWS_ENDPOINT_URL_STS points every STS call, the providers' own included, at the emulator.
Prints one JSON object: per case either {"ok": true, "arn", "account"} or {"ok": false,
"code", "status", "error"}. No secret is printed.
"""
import json
import os
import sys

import boto3
import botocore.exceptions

cases = json.loads(os.environ["CASES"])
base = dict(os.environ)
out = {}
for name, case in cases.items():
    os.environ.clear()
    os.environ.update(base)
    os.environ.update(case.get("env", {}))
    try:
        session = boto3.Session(profile_name=case.get("profile"))
        tamper = case.get("tamper")
        if tamper:
            # Real credentials from the emulator, one part changed: the signature check must see it.
            c = session.get_credentials().get_frozen_credentials()
            key, secret, token = c.access_key, c.secret_key, c.token
            if tamper == "secret":
                secret = secret[:-4] + "AAAA"
            elif tamper == "key":
                key = "ASIA" + "Z" * 16
            elif tamper == "token":
                token = token[:-8] + "AAAAAAAA"
            session = boto3.Session(aws_access_key_id=key, aws_secret_access_key=secret, aws_session_token=token)
        identity = session.client("sts").get_caller_identity()
        out[name] = {"ok": True, "arn": identity["Arn"], "account": identity["Account"]}
    except botocore.exceptions.ClientError as e:
        out[name] = {
            "ok": False,
            "code": e.response.get("Error", {}).get("Code"),
            "status": e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
            "error": str(e),
        }
    except Exception as e:  # a provider's own error type: keep the text, which names the code
        out[name] = {"ok": False, "code": None, "status": None, "error": f"{type(e).__name__}: {e}"}
print(json.dumps(out))
sys.exit(0)
