"""A proxyless gRPC client (grpcio's own xds resolver), run as a process of its own.

C-core reads the xDS bootstrap once per process (``GRPC_XDS_BOOTSTRAP_CONFIG``, set by the test),
so every client with a bootstrap of its own is a process. Usage: ``xds_client.py TARGET``; then,
one command a line on stdin, one JSON line answered on stdout:

- ``run N``: N unary calls of ``/test.Who/Who``; the count of each answer (a backend's name)
  and of each error (``CODE: details``);
- ``until NAME``: calls until backend NAME answers (10 s at most); the Unix time it did (null
  when it did not) and the answers before;
- ``keys N HEADER``: two calls for each of N keys (``HEADER: key-i``); the count of each answer
  to the first call, and how many keys the second call took elsewhere.
"""

from __future__ import annotations

import json
import sys
import time

import grpc


def main() -> None:
    with grpc.insecure_channel(sys.argv[1]) as channel:
        call = channel.unary_unary("/test.Who/Who")
        for line in sys.stdin:
            command = line.split()
            if command[0] == "run":
                counts: dict[str, int] = {}
                errors: dict[str, int] = {}
                for _ in range(int(command[1])):
                    try:
                        answer = call(b"", timeout=5).decode()
                        counts[answer] = counts.get(answer, 0) + 1
                    except grpc.RpcError as exc:
                        error = f"{exc.code().name}: {(exc.details() or '')[:300]}"
                        errors[error] = errors.get(error, 0) + 1
                print(json.dumps({"counts": counts, "errors": errors}), flush=True)
            elif command[0] == "keys":
                first: dict[str, str] = {}
                moved = 0
                for i in range(int(command[1])):
                    metadata = ((command[2], f"key-{i}"),)
                    answers = [call(b"", timeout=5, metadata=metadata).decode() for _ in range(2)]
                    first[f"key-{i}"] = answers[0]
                    moved += answers[0] != answers[1]
                counts = {}
                for answer in first.values():
                    counts[answer] = counts.get(answer, 0) + 1
                print(json.dumps({"counts": counts, "moved": moved}), flush=True)
            elif command[0] == "until":
                deadline, seen, at = time.monotonic() + 10, [], None
                while time.monotonic() < deadline:
                    try:
                        answer = call(b"", timeout=5).decode()
                    except grpc.RpcError as exc:
                        answer = exc.code().name
                    if answer == command[1]:
                        at = time.time()
                        break
                    seen.append(answer)
                print(json.dumps({"at": at, "before": len(seen)}), flush=True)


if __name__ == "__main__":
    main()
