"""EKS authentication tokens made by the AWS CLI's own code (awscli.customizations.eks.get_token),
and variants the control plane must refuse, for tests/eks_identity.rs.

The credentials are the environment's (the emulator's, through dev's container provider), STS is
AWS_ENDPOINT_URL_STS. CASES maps a name to {"cluster": str, "minutes_ago": int,
"sign_cluster_header": bool, "endpoint": str or null, "tamper": bool}. Prints one JSON object:
name -> token. No secret is printed (a token is a presigned URL: it carries the session token,
which the test never logs).
"""
import base64
import datetime
import json
import os
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import botocore.auth
import botocore.session
from awscli.customizations.eks.get_token import STSClientFactory, TokenGenerator, TOKEN_PREFIX


def encode(url):
    return TOKEN_PREFIX + base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")


def token(case):
    session = botocore.session.get_session()
    real_now = botocore.auth.get_current_datetime
    ago = datetime.timedelta(minutes=case.get("minutes_ago", 0))
    botocore.auth.get_current_datetime = lambda: real_now() - ago
    try:
        if case.get("endpoint"):
            os.environ["AWS_ENDPOINT_URL_STS"] = case["endpoint"]
        if case.get("sign_cluster_header", True):
            sts = STSClientFactory(session).get_sts_client(region_name="us-east-1")
            t = TokenGenerator(sts).get_token(case["cluster"])
        else:
            sts = session.create_client("sts", region_name="us-east-1")
            t = encode(sts.generate_presigned_url("get_caller_identity", ExpiresIn=60, HttpMethod="GET"))
    finally:
        botocore.auth.get_current_datetime = real_now
    if case.get("tamper"):
        encoded = t[len(TOKEN_PREFIX):]
        url = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        parts = urlsplit(url)
        query = [(k, "2011-06-16" if k == "Version" else v) for k, v in parse_qsl(parts.query)]
        t = encode(urlunsplit(parts._replace(query=urlencode(query))))
    return t


base = dict(os.environ)
out = {}
for name, case in json.loads(os.environ["CASES"]).items():
    os.environ.clear()
    os.environ.update(base)
    out[name] = token(case)
print(json.dumps(out))
