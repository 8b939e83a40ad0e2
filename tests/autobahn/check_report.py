#!/usr/bin/env python3
"""Reads an Autobahn|Testsuite index.json and fails unless every case's behaviour, and its
closing behaviour, is OK, NON-STRICT or INFORMATIONAL. Prints a one-line summary per outcome."""
import collections
import json
import sys

ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}


def main(path):
    with open(path) as f:
        index = json.load(f)
    failures = []
    outcomes = collections.Counter()
    total = 0
    for agent, cases in index.items():
        for case, result in sorted(cases.items(), key=lambda kv: [int(p) for p in kv[0].split(".")]):
            total += 1
            behavior, closing = result.get("behavior"), result.get("behaviorClose")
            outcomes[behavior] += 1
            if behavior not in ACCEPTED or closing not in ACCEPTED:
                failures.append("%s %s: behavior=%s close=%s" % (agent, case, behavior, closing))
    if total == 0:
        print("autobahn: no cases in %s" % path)
        return 1
    summary = ", ".join("%s %d" % (k, v) for k, v in sorted(outcomes.items()))
    print("autobahn: %d cases: %s" % (total, summary))
    for failure in failures:
        print("autobahn: FAILED " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
