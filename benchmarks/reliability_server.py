"""`charlstm serve` under hostile clients (issue 15, section 4).

Starts the server in a child process with small limits and sends it, in turn: malformed
JSON, wrong types, huge and deeply nested bodies, invalid UTF-8, prompts full of unknown
characters, ``max_tokens`` of 10^9, thousands of stop strings, a body that never finishes
arriving, clients that open a stream and never read, clients that disconnect mid-stream, and
500 connections at once against ``--max-concurrent``/``--max-queue``; between the groups a
well-behaved client must still be served. ``main()`` prints (and returns) the requests sent,
how they were answered by status class, what was expected but not seen, whether the server
went back to 0 active streams, and its RSS before and after.

    flock /tmp/charlstm-bench.lock python benchmarks/reliability_server.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (Server, default_checkpoint, read_body_chunks, read_response_head,  # noqa: E402
                        request_bytes, stream_completion)

PROMPT = "alice was beginning to get very tired"
LIMITS = ["--max-concurrent", "16", "--max-queue", "32", "--max-length", "2000", "--request-timeout", "4",
          "--max-body", "1048576", "--threads", "1"]


@dataclass
class Tally:
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)

    def record(self, case: str, status: int, expected: set[int]) -> None:
        self.sent += 1
        self.statuses[status] += 1
        if status not in expected:
            self.unexpected.append(f"{case}: {status} (expected {sorted(expected)})")

    def by_class(self) -> dict[str, int]:
        classes: Counter = Counter()
        for status, count in self.statuses.items():
            name = status if isinstance(status, str) else "no answer" if status <= 0 else f"{status // 100}xx"
            classes[name] += count
        return dict(sorted(classes.items()))


async def raw_request(server: Server, payload: bytes, read_body: bool = True) -> int:
    """Send raw bytes; the response status (0: no answer)."""
    try:
        reader, writer = await asyncio.open_connection(server.host, server.port)
    except OSError:
        return 0
    try:
        writer.write(payload)
        await writer.drain()
        status, headers = await asyncio.wait_for(read_response_head(reader), 30)
        if read_body:
            async for _ in read_body_chunks(reader, headers):
                pass
        return status
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        return 0
    finally:
        writer.close()


def post(server: Server, body: dict | bytes, path: str = "/v1/completions") -> bytes:
    return request_bytes(server.host, path, body)


def bad_bodies() -> list[tuple[str, bytes, set[int]]]:
    """(case, body, the statuses it should get): each must be refused."""
    cases = [("malformed", b, {400}) for b in (b"{", b"}", b"{\"prompt\": }", b"nul\x00l", b"[1,2", b"\"just a string\"",
                                         b"{\"prompt\": \"x\", \"n\": NaN}", b"{\"prompt\": \"x\",}", b"",
                                         b"{\"max_tokens\": " + b"9" * 10000 + b"}")]
    wrong_types = {"prompt": [5, None, True, {"a": 1}, [[1, 2]], [None]], "max_tokens": ["5", 1.5, True, [], -3],
                   "temperature": ["hot", [], {}, -1, 1e308, 1e-300], "top_p": [0, 2, "x"],
                   "top_k": [1.5, "5", 10 ** 30], "n": [0, "2", 10 ** 6], "stop": [5, [1], [""], {"a": "b"}],
                   "seed": ["1", 1.5, 10 ** 40], "stream": ["true", 1], "logprobs": [True, 999, "5"],
                   "echo": ["yes"], "model": [5, ["alice"]],
                   "prime_unknown": ["maybe", 1]}
    for name, values in wrong_types.items():
        for value in values:
            body = {"prompt": PROMPT, name: value}
            cases.append((f"wrong type {name}", json.dumps(body).encode(), {400}))
    cases += [(case, body, {400}) for case, body in [
        ("deeply nested", b"[" * 200_000 + b"]" * 200_000),
        ("deeply nested object", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        ("invalid UTF-8", b'{"prompt": "\xc3\x28\xff"}'),
        ("lone surrogate", b'{"prompt": "\\ud800abc"}'),
        ("unknown characters", json.dumps({"prompt": "☃✈\u0000\U0001F600" * 2000}).encode()),
        ("unknown characters skipped", json.dumps({"prompt": "☃✈" * 4000, "prime_unknown": "skip"}).encode()),
        ("max_tokens 10^9", json.dumps({"prompt": PROMPT, "max_tokens": 10 ** 9}).encode()),
        ("thousands of stop strings", json.dumps({"prompt": PROMPT, "stop": [f"s{i}" for i in range(5000)]}).encode()),
        ("long prompt", json.dumps({"prompt": "a" * 100_000}).encode()),
        ("many prompts", json.dumps({"prompt": [PROMPT] * 10_000}).encode()),
        ("unrecognized field", json.dumps({"prompt": PROMPT, "x" * 1000: 1}).encode()),
    ]]
    cases += [("model as a path", json.dumps({"prompt": PROMPT, "model": "../../etc/passwd"}).encode(), {404}),
              ("model name of 10,000 characters", json.dumps({"prompt": PROMPT, "model": "x" * 10000}).encode(), {404})]
    return cases


async def hostile(server: Server, tally: Tally, never_reading: int, disconnecting: int, crowd: int) -> None:
    async def well_behaved(label: str) -> None:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        result = await stream_completion(reader, writer, server.host, {"prompt": PROMPT, "max_tokens": 50,
                                                                       "stream": True})
        writer.close()
        tally.record(f"well-behaved after {label}", result.status if result.ok else -1, {200})

    for case, body, expected in bad_bodies():
        tally.record(case, await raw_request(server, post(server, body)), expected)
    await well_behaved("bad bodies")
    score = json.dumps({"text": "☃" * 30000}).encode()
    tally.record("score: text over the limit", await raw_request(server, post(server, score, "/v1/score")), {400})

    huge = json.dumps({"prompt": "a" * (3 << 20)}).encode()
    tally.record("3 MB body", await raw_request(server, post(server, huge)), {413})
    claim = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {10 ** 12}\r\n\r\n").encode()
    tally.record("Content-Length 10^12", await raw_request(server, claim), {413})
    stalled = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\":"
    tally.record("body never finishes", await raw_request(server, stalled), {408})
    await well_behaved("huge and stalled bodies")

    # clients that open a stream and never read: the server keeps serving others meanwhile
    lazies = []
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2000, "stream": True}).encode()
    for _ in range(never_reading):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.connect((server.host, server.port))
        sock.sendall(post(server, body))
        lazies.append(sock)
    tally.sent += never_reading   # answered (200, then cut off at the time limit); not read here
    tally.statuses["never read"] += never_reading
    await well_behaved("clients that never read")

    # clients that disconnect mid-stream
    async def leave_early() -> None:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(post(server, {"prompt": PROMPT, "max_tokens": 2000, "stream": True}))
        await writer.drain()
        status, _ = await read_response_head(reader)
        await reader.read(200)
        writer.transport.abort()
        tally.record("disconnect mid-stream", status, {200, 429})

    await asyncio.gather(*(leave_early() for _ in range(disconnecting)))
    await well_behaved("disconnects")
    for sock in lazies:
        sock.close()

    # many connections at once: each gets 200 or 429, nothing is dropped
    async def one_of_many(k: int) -> None:
        payload = post(server, {"prompt": PROMPT, "max_tokens": 100, "stream": True, "seed": k})
        tally.record("crowd", await raw_request(server, payload), {200, 429})

    await asyncio.gather(*(one_of_many(k) for k in range(crowd)))
    await well_behaved("the crowd")


def health(server: Server) -> dict:
    import urllib.request

    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="model to serve (default: random 2x256 over Alice)")
    parser.add_argument("--never-reading", type=int, default=20)
    parser.add_argument("--disconnecting", type=int, default=50)
    parser.add_argument("--crowd", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3,
                        help="repeat everything: memory that keeps growing round after round would be a leak")
    args = parser.parse_args(argv)
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(args.checkpoint or default_checkpoint(Path(tmp)), *LIMITS)
        try:
            asyncio.run(_warm(server))
            rss_before = server.rss_mib()
            start = time.monotonic()
            rss_rounds = []
            for _ in range(args.rounds):
                asyncio.run(hostile(server, tally, args.never_reading, args.disconnecting, args.crowd))
                deadline = time.monotonic() + 15
                while (h := health(server))["active"] + h["waiting"] and time.monotonic() < deadline:
                    time.sleep(0.1)
                asyncio.run(_warm(server))
                rss_rounds.append(server.rss_mib())
            rss_after = rss_rounds[-1]
            seconds = time.monotonic() - start
            final = health(server)
        finally:
            code = server.stop()
    report = {"requests_sent": tally.sent, "answered_by_class": tally.by_class(),
              "statuses": {str(k): v for k, v in sorted(tally.statuses.items(), key=str)},
              "unexpected": tally.unexpected, "active_after": final["active"], "waiting_after": final["waiting"],
              "rss_before_mib": rss_before, "rss_after_mib": rss_after, "rss_after_each_round_mib": rss_rounds,
              "seconds": seconds, "exit_status": code}
    print("## charlstm serve under hostile clients")
    print(f"requests sent: {tally.sent} in {seconds:.1f} s")
    print("answered: " + ", ".join(f"{k} {v}" for k, v in report["answered_by_class"].items())
          + " (never read: 200 then cut at the time limit)")
    print("statuses: " + ", ".join(f"{k}: {v}" for k, v in report["statuses"].items()))
    print(f"not as expected: {len(tally.unexpected)}" + "".join(f"\n  {u}" for u in tally.unexpected[:20]))
    print(f"after: {final['active']} active, {final['waiting']} waiting streams; the server exited {code} on SIGINT")
    print(f"server RSS: {rss_before:.1f} MiB before, {rss_after:.1f} MiB after "
          f"({rss_after - rss_before:+.1f} MiB); after each of the {args.rounds} rounds: "
          + ", ".join(f"{r:.1f}" for r in rss_rounds) + " MiB")
    return report


async def _warm(server: Server) -> None:
    for _ in range(5):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        await stream_completion(reader, writer, server.host, {"prompt": PROMPT, "max_tokens": 200, "stream": True})
        writer.close()


if __name__ == "__main__":
    main()
