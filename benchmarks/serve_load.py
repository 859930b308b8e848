"""Load on `charlstm serve`: 1, 8, 32 and 128 concurrent streaming clients, a fixed time each.

Starts the server in a child process (a 2x256 default-recipe model: ``--checkpoint FILE``, or
by default a seeded random initialisation over Alice's characters; speed does not depend on
the weights), then runs each level for ``--seconds``: every client sends streaming
completions back to back on one kept-alive connection. Prints, per level: requests/s, p50
and p99 time to first character (request sent -> first generated character received),
aggregate characters/s, and errors (any status but 200, a broken stream, or a finish reason
other than length/stop). Targets on a 2-core machine: 0 errors at every level, p99 time to
first character under 100 ms at 32 clients, characters/s at 32 clients >= 3x one client's.

The clients are a lean asyncio HTTP/1.1 reader (no HTTP library), so that they take little
of the CPU they share with the server.

    flock /tmp/charlstm-bench.lock python benchmarks/serve_load.py [--checkpoint FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALICE = REPO.parent / "shared" / "corpora" / "pg11.txt"
PROMPTS = ["alice was beginning to get very tired of sitting by her sister",
           "the rabbit took a watch out of its waistcoat-pocket, and",
           "'curiouser and curiouser!' cried alice",
           "down, down, down. there was nothing else to do, so"]


# ----------------------------------------------------------------------------- the server


def default_checkpoint(folder: Path) -> Path:
    """A 2x256 default-recipe model, seeded random weights, over Alice's characters."""
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from charlstm import checkpoint
    from charlstm.checkpoint import TrainedModel
    from charlstm.corpus import Corpus
    from charlstm.model import CharLSTM, ModelConfig
    from charlstm.vocab import Vocab

    torch.manual_seed(0)
    vocab = Vocab.from_text(Corpus.from_files([ALICE]).text)
    path = folder / "alice-2x256-random.safetensors"
    checkpoint.save(path, TrainedModel(CharLSTM(ModelConfig(vocab_size=len(vocab))).eval(), vocab))
    return path


class Server:
    """``charlstm serve`` in a child process on a free 127.0.0.1 port."""

    def __init__(self, checkpoint: Path, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        self.proc = subprocess.Popen([sys.executable, "-m", "charlstm", "serve", str(checkpoint), "--port", "0",
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        first = self.proc.stdout.readline()
        if "http://" not in first:
            raise SystemExit(f"the server did not start: {first}{self.proc.stderr.read()}")
        self.url = first.split()[2].rstrip("/")
        self.host, port = self.url.removeprefix("http://").split(":")
        self.port = int(port)
        while (line := self.proc.stdout.readline()) and line.strip() != "ready":
            pass

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        self.proc.send_signal(2)
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        return self.proc.returncode


# ----------------------------------------------------------------------------- a lean client


class HttpError(Exception):
    pass


async def read_response_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise HttpError("connection closed")
    status = int(status_line.split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The body's pieces as they arrive (chunked, or Content-Length)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return
            yield data[:-2]
    else:
        yield await reader.readexactly(int(headers.get("content-length", "0")))


def request_bytes(host: str, path: str, body: dict | bytes, extra: str = "") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{extra}\r\n").encode() + data


@dataclass
class Result:
    ok: bool
    status: int
    first_char_s: float | None = None
    chars: int = 0
    finish: str | None = None


async def stream_completion(reader, writer, host: str, body: dict, on_chars=None) -> Result:
    """One streaming completion on an open connection; times the first generated character."""
    start = time.perf_counter()
    writer.write(request_bytes(host, "/v1/completions", body))
    await writer.drain()
    status, headers = await read_response_head(reader)
    result = Result(ok=False, status=status)
    buffer, done = b"", False
    async for chunk in read_body_chunks(reader, headers):
        if status != 200:
            continue
        buffer += chunk
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[:end], buffer[end + 2:]
            data = event.removeprefix(b"data: ")
            if data == b"[DONE]":
                done = True
                continue
            choice = json.loads(data)["choices"][0]
            if choice["text"]:
                if result.first_char_s is None:
                    result.first_char_s = time.perf_counter() - start
                result.chars += len(choice["text"])
                if on_chars:
                    on_chars(len(choice["text"]))
            result.finish = choice["finish_reason"] or result.finish
    result.ok = status == 200 and done and result.finish in ("length", "stop")
    return result


# ----------------------------------------------------------------------------- one level


@dataclass
class Level:
    clients: int
    seconds: float
    results: list[Result] = field(default_factory=list)
    chars_in_window: int = 0
    errors: int = 0
    server_cpu_s: float = 0.0

    def row(self, base_chars_per_s: float | None) -> dict:
        firsts = sorted(r.first_char_s for r in self.results if r.first_char_s is not None)
        pct = lambda q: firsts[min(len(firsts) - 1, int(q * len(firsts)))] * 1000 if firsts else float("nan")  # noqa: E731
        cps = self.chars_in_window / self.seconds
        return {"clients": self.clients, "requests": len(self.results),
                "server_cores": self.server_cpu_s / self.seconds,
                "chars_per_cpu_s": self.chars_in_window / self.server_cpu_s if self.server_cpu_s else float("nan"),
                "requests_per_s": len(self.results) / self.seconds, "ttfc_p50_ms": pct(0.50),
                "ttfc_p99_ms": pct(0.99), "chars_per_s": cps,
                "vs_one_client": cps / base_chars_per_s if base_chars_per_s else 1.0, "errors": self.errors}


async def run_level(server: Server, clients: int, seconds: float, max_tokens: int) -> Level:
    level = Level(clients, seconds)
    stop_at = time.perf_counter() + seconds
    cpu_start = server.cpu_seconds()

    def count(n: int) -> None:
        if time.perf_counter() < stop_at:
            level.chars_in_window += n

    async def client(k: int) -> None:
        rng = random.Random(k)
        reader = writer = None
        while time.perf_counter() < stop_at:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(server.host, server.port)
                body = {"prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, "temperature": 0.8,
                        "seed": rng.randrange(2 ** 31), "stream": True}
                result = await stream_completion(reader, writer, server.host, body, count)
            except (OSError, HttpError, asyncio.IncompleteReadError, ValueError):
                result = Result(ok=False, status=0)
                writer = None
            if time.perf_counter() <= stop_at + 60:
                level.results.append(result)
                level.errors += not result.ok
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    level.server_cpu_s = server.cpu_seconds() - cpu_start   # includes the finishing requests' tails
    return level


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="model to serve (default: random 2x256 over Alice)")
    parser.add_argument("--levels", default="1,8,32,128", help="concurrent clients per level")
    parser.add_argument("--seconds", type=float, default=10.0, help="time per level")
    parser.add_argument("--max-tokens", type=int, default=200, help="characters per request")
    parser.add_argument("--threads", type=int, default=2, help="the server's --threads")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or default_checkpoint(Path(tmp))
        server = Server(ckpt, "--threads", str(args.threads), "--max-concurrent", str(max(levels)),
                        "--max-queue", str(4 * max(levels)))
        load_before = os.getloadavg()
        rows, base = [], None
        try:
            asyncio.run(run_level(server, 1, 1.0, args.max_tokens))   # warm-up
            for clients in levels:
                level = asyncio.run(run_level(server, clients, args.seconds, args.max_tokens))
                row = level.row(base)
                base = base or row["chars_per_s"]
                rows.append(row)
        finally:
            server.stop()
    load_after = os.getloadavg()
    print(f"# charlstm serve under load: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# machine: {machine()}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          "(1 min; the clients run on the same machine)")
    print(f"# model: {ckpt.name if args.checkpoint else '2x256 default recipe, random weights'}; "
          f"{args.max_tokens} characters per request, temperature 0.8, {args.seconds:g} s per level, "
          f"server --threads {args.threads}")
    print()
    print("| clients | requests/s | p50 first char (ms) | p99 first char (ms) | chars/s | vs 1 client | errors "
          "| server CPU (cores) | chars per server CPU-second |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests_per_s']:.1f} | {r['ttfc_p50_ms']:.1f} | {r['ttfc_p99_ms']:.1f} | "
              f"{r['chars_per_s']:,.0f} | {r['vs_one_client']:.2f}x | {r['errors']} | {r['server_cores']:.2f} | "
              f"{r['chars_per_cpu_s']:,.0f} |")
    return rows


if __name__ == "__main__":
    main()
