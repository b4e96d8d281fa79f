"""Evaluate a ValidatingAdmissionPolicy's CEL as the API server would, for tests/manifests.rs.

Reads JSON on stdin: {"policy": <the policy's spec>, "cases": [{"request": ..., "object": ...,
"oldObject": ...}]}. Prints JSON: one result per case, {"matched": bool, "denied": [messages]}:
whether the policy's matchConditions select the request, and the message of every validation
that does not hold (an expression that fails to evaluate denies, as failurePolicy Fail does).
Variables are evaluated in order and offered as `variables.<name>`. Uses cel-python (standard
CEL with its macros); the policy keeps to that subset so this evaluation is the API server's.
"""

import json
import sys

import celpy


def evaluate(env, expression, activation):
    program = env.program(env.compile(expression))
    return program.evaluate(activation)


def main():
    spec_and_cases = json.load(sys.stdin)
    spec = spec_and_cases["policy"]
    env = celpy.Environment()
    results = []
    for case in spec_and_cases["cases"]:
        activation = {
            name: celpy.json_to_cel(case.get(name))
            for name in ("request", "object", "oldObject")
        }
        matched = all(
            bool(evaluate(env, c["expression"], activation))
            for c in spec.get("matchConditions", [])
        )
        denied = []
        if matched:
            variables = {}
            for v in spec.get("variables", []):
                activation["variables"] = celpy.json_to_cel(variables)
                value = evaluate(env, v["expression"], activation)
                variables[v["name"]] = value
            activation["variables"] = celpy.celtypes.MapType(
                {celpy.celtypes.StringType(k): v for k, v in variables.items()}
            )
            for rule in spec["validations"]:
                try:
                    ok = evaluate(env, rule["expression"], activation)
                    ok = ok is True or (isinstance(ok, celpy.celtypes.BoolType) and bool(ok))
                except Exception as e:  # an evaluation error denies (failurePolicy: Fail)
                    ok = False
                if not ok:
                    denied.append(rule.get("message", rule["expression"]))
        results.append({"matched": matched, "denied": denied})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
