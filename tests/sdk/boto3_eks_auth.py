"""Call EKS Auth's AssumeRoleForPodIdentity with boto3's own eks-auth client, once per case.

Environment: EMULATOR (endpoint URL), CLUSTER, CASES (JSON: name -> {"token", "signed"}).
Prints one JSON object: name -> the answer's fields, or the error code and HTTP status.
"""
import datetime
import json
import os

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

cases = json.loads(os.environ["CASES"])
out = {}
for name, case in cases.items():
    config = Config(retries={"total_max_attempts": 1})
    if not case.get("signed", True):
        config = Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1})
    client = boto3.client(
        "eks-auth", endpoint_url=os.environ["EMULATOR"], region_name="us-west-2",
        aws_access_key_id="AKIANODEEXAMPLE00001", aws_secret_access_key="node-secret", config=config)
    try:
        r = client.assume_role_for_pod_identity(clusterName=os.environ["CLUSTER"], token=case["token"])
        creds = r["credentials"]
        now = datetime.datetime.now(datetime.timezone.utc)
        out[name] = {
            "ok": True,
            "access_key": creds["accessKeyId"],
            "has_secret": bool(creds["secretAccessKey"]),
            "has_session_token": bool(creds["sessionToken"]),
            "lifetime_s": (creds["expiration"] - now).total_seconds(),
            "namespace": r["subject"]["namespace"],
            "service_account": r["subject"]["serviceAccount"],
            "audience": r["audience"],
            "role_arn": r["assumedRoleUser"]["arn"],
            "association_id": r["podIdentityAssociation"]["associationId"],
        }
    except ClientError as e:
        out[name] = {"ok": False, "code": e.response["Error"]["Code"],
                     "status": e.response["ResponseMetadata"]["HTTPStatusCode"]}
print(json.dumps(out))
