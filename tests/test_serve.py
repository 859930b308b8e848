"""charlstm serve: the OpenAI-style API, continuous batching, limits and shutdown.

Models are seeded random initialisations over the vocabulary of real text (Alice): the
API's behaviour does not depend on what the weights learned, and they build in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from charlstm import checkpoint
from charlstm.batching import Engine, Stream, StreamSpec
from charlstm.checkpoint import TrainedModel
from charlstm.generate import Generator, SamplingConfig
from charlstm.model import CharLSTM, ModelConfig
from charlstm.serve import ServeConfig, create_app
from charlstm.evaluate import evaluate_ids
from charlstm.vocab import Vocab
from serve_support import LiveServer, make_model

warnings.filterwarnings("ignore", message=".*httpx.*", category=Warning)
from starlette.testclient import TestClient  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "alice was beginning to get very tired"


@pytest.fixture(scope="session")
def alice(small_text) -> str:
    return small_text.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def trained(alice) -> TrainedModel:
    return make_model(alice)


@pytest.fixture(scope="session")
def checkpoint_file(tmp_path_factory, alice) -> Path:
    path = tmp_path_factory.mktemp("serve") / "alice.safetensors"
    checkpoint.save(path, make_model(alice, units=128))
    return path


@pytest.fixture
def client(trained):
    with TestClient(create_app(ServeConfig(max_length=500), {"alice": trained})) as c:
        yield c


def completion(client, **body) -> dict:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(lines) -> list:
    """The data of each event; asserts the framing (data lines separated by blank lines)."""
    events, expect_blank = [], False
    for line in lines:
        if expect_blank:
            assert line == "", f"event not followed by a blank line: {line!r}"
            expect_blank = False
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
        expect_blank = True
    return events


# ----------------------------------------------------------------------------- completions


def test_completion_fields_echo_logprobs_usage(client):
    body = completion(client, model="alice", prompt=[PROMPT, "the rabbit"], n=2, max_tokens=40,
                      temperature=0.9, top_k=20, top_p=0.95, seed=7, logprobs=3, echo=True)
    assert body["object"] == "text_completion" and body["model"] == "alice" and body["seed"] == 7
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c in choices:
        prompt = PROMPT if c["index"] < 2 else "the rabbit"
        assert c["text"].startswith(prompt) and len(c["text"]) == len(prompt) + 40
        assert c["finish_reason"] == "length"
        lp = c["logprobs"]
        assert "".join(lp["tokens"]) == c["text"]
        assert lp["text_offset"] == list(range(len(c["text"])))
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert len(top) == 3 and value <= 0
            assert list(top.values()) == sorted(top.values(), reverse=True)
            assert value <= max(top.values()) + 1e-12
            if token in top:
                assert math.isclose(top[token], value)
    assert choices[0]["text"] != choices[1]["text"]      # seeds 7 and 8
    assert body["usage"] == {"prompt_tokens": len(PROMPT) + len("the rabbit"), "completion_tokens": 160,
                             "total_tokens": len(PROMPT) + len("the rabbit") + 160}


def test_seeded_completion_is_the_generators_text(client, trained):
    for sampling in (SamplingConfig(0.8), SamplingConfig(1.0, 5, 0.9), SamplingConfig(0.0)):
        body = completion(client, prompt=PROMPT, max_tokens=120, seed=123, temperature=sampling.temperature,
                          top_k=sampling.top_k, top_p=sampling.top_p)
        expected = Generator(trained).generate(PROMPT, 120, sampling=sampling, seed=123)
        assert body["choices"][0]["text"] == expected


def test_stop_string_and_finish_reason(client):
    free = completion(client, prompt=PROMPT, max_tokens=200, seed=5)["choices"][0]
    assert free["finish_reason"] == "length"
    stop = free["text"][60:62]
    first = free["text"].find(stop)
    stopped = completion(client, prompt=PROMPT, max_tokens=200, seed=5, stop=[stop, "\x00never"])["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == free["text"][:first]
    never = completion(client, prompt=PROMPT, max_tokens=200, seed=5, stop="\x00never")["choices"][0]
    assert never == free
    # a stop string that begins at the very end is held back, then released at the length limit
    cut = completion(client, prompt=PROMPT, max_tokens=first + 1, seed=5, stop=stop + "\x00")["choices"][0]
    assert cut["finish_reason"] == "length" and cut["text"] == free["text"][:first + 1]


def test_streaming_framing_equals_the_plain_answer(client):
    plain = completion(client, prompt=PROMPT, max_tokens=300, seed=11, logprobs=2)
    with client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 300, "seed": 11,
                                                        "logprobs": 2, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    assert all(e["object"] == "text_completion" and e["id"] == chunks[0]["id"] for e in chunks)
    assert len(chunks) >= 2     # the first character goes out on its own, at once
    text = "".join(e["choices"][0]["text"] for e in chunks)
    assert text == plain["choices"][0]["text"]
    assert [e["choices"][0]["finish_reason"] for e in chunks] == [None] * (len(chunks) - 1) + ["length"]
    tokens = [t for e in chunks for t in e["choices"][0]["logprobs"]["tokens"]]
    offsets = [t for e in chunks for t in e["choices"][0]["logprobs"]["text_offset"]]
    assert "".join(tokens) == text and offsets == list(range(len(text)))


def test_prompt_normalisation_unknown_characters_and_skip(client, trained):
    r = client.post("/v1/completions", json={"prompt": "alice ☃ went ✈", "max_tokens": 5})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "prompt" and "'☃'" in err["message"] and "'✈'" in err["message"]
    assert err["type"] == "invalid_request_error"
    body = completion(client, prompt="ALICE ☃ went", max_tokens=0, echo=True, prime_unknown="skip")
    assert body["choices"][0]["text"] == "alice  went" and body["choices"][0]["finish_reason"] == "length"
    r = client.post("/v1/completions", json={"prompt": "☃☃☃", "prime_unknown": "skip"})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]


BAD_REQUESTS = [
    ({"prompt": PROMPT, "max_tokens": 10 ** 9}, "max_tokens", "--max-length"),
    ({"prompt": PROMPT, "max_tokens": -1}, "max_tokens", None),
    ({"prompt": PROMPT, "max_tokens": "10"}, "max_tokens", "integer"),
    ({"prompt": PROMPT, "max_tokens": 10.5}, "max_tokens", "integer"),
    ({"prompt": PROMPT, "max_tokens": True}, "max_tokens", "integer"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature", None),
    ({"prompt": PROMPT, "temperature": 1e-300}, "temperature", "greedy"),
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature", "number"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p", None),
    ({"prompt": PROMPT, "top_p": 1.5}, "top_p", None),
    ({"prompt": PROMPT, "top_k": 10 ** 20}, "top_k", None),
    ({"prompt": PROMPT, "n": 0}, "n", None),
    ({"prompt": PROMPT, "n": 17}, "n", "--max-choices"),
    ({"prompt": [PROMPT] * 9, "n": 2}, "n", "--max-choices"),
    ({"prompt": PROMPT, "stop": ["a"] * 5000}, "stop", "--max-stop"),
    ({"prompt": PROMPT, "stop": [""]}, "stop", "empty"),
    ({"prompt": PROMPT, "stop": 5}, "stop", None),
    ({"prompt": PROMPT, "stop": "x" * 1000}, "stop", None),
    ({"prompt": PROMPT, "logprobs": 21}, "logprobs", "--max-logprobs"),
    ({"prompt": PROMPT, "seed": 2 ** 70}, "seed", None),
    ({"prompt": PROMPT, "stream": "yes"}, "stream", None),
    ({"prompt": PROMPT, "echo": 1}, "echo", None),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options", None),
    ({"prompt": PROMPT, "prime_unknown": "drop"}, "prime_unknown", None),
    ({"prompt": PROMPT, "presence_penalty": 0.5}, "presence_penalty", None),
    ({"prompt": PROMPT, "logit_bias": {"a": 1}}, "logit_bias", None),
    ({"prompt": PROMPT, "best_of": 3}, "best_of", None),
    ({"prompt": PROMPT, "temprature": 0.5}, "temprature", "unrecognized"),
    ({"prompt": [1, 2, 3]}, "prompt", "token ids"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", None),
    ({"prompt": {"text": PROMPT}}, "prompt", None),
    ({}, "prompt", "required"),
    ({"prompt": "a" * 8193}, "prompt", "--max-prompt"),
    ({"prompt": PROMPT, "model": 3}, "model", None),
]


@pytest.mark.parametrize("body,param,words", BAD_REQUESTS)
def test_bad_fields_are_400_naming_the_field(client, body, param, words):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["type"] == "invalid_request_error"
    if words:
        assert words in err["message"]


@pytest.mark.parametrize("raw,words", [
    (b"{", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"prompt": "\xff\xfe"}', "UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"prompt": "x", "temperature": NaN}', "not valid JSON"),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"", "not valid JSON"),
])
def test_malformed_bodies_are_400(client, raw, words):
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_body_limit_413_unknown_model_404_and_routes(trained):
    app = create_app(ServeConfig(max_body=1000), {"alice": trained, "other": trained})
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": "alice", "prompt": "a" * 2000})
        assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]

        def chunks():   # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b" " * 500
        r = c.post("/v1/completions", content=chunks())
        assert r.status_code == 413
        r = c.post("/v1/completions", json={"model": "../../etc/passwd", "prompt": "a"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/completions", json={"prompt": "a"})       # two models: model is required
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert c.get("/v1/nothing").status_code == 404
        assert c.get("/v1/completions").status_code == 405
        assert c.get("/v1/models/nope").status_code == 404


def test_models_health_openapi_and_page(client, trained):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    (model,) = models["data"]
    info = model["charlstm"]
    assert model["id"] == "alice" and info["vocab"] == list(trained.vocab.chars)
    assert info["parameters"] == trained.model.num_parameters()
    assert info["config"]["units"] == 48 and math.isclose(info["val_bits_per_char"], 1.5 / math.log(2))
    assert client.get("/v1/models/alice").json()["id"] == "alice"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["active"] == 0 and health["models"] == ["alice"]
    spec = client.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/score", "/v1/models", "/health"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert "http" not in "".join(line for line in page.text.splitlines() if "src=" in line or "href=" in line)


def test_score_matches_evaluation(client, trained, alice):
    text = alice[1000:1400]
    body = client.post("/v1/score", json={"text": text, "top": 3}).json()
    assert body["chars"] == list(text) and body["probs"][0] is None and body["bits"][0] is None
    bits = np.array(body["bits"][1:])
    assert np.allclose(bits, -np.log2(body["probs"][1:]))
    assert math.isclose(body["bits_per_char"], bits.mean(), rel_tol=1e-9)
    nats = evaluate_ids(trained.model, trained.vocab.encode(text))
    assert math.isclose(body["bits_per_char"], nats / math.log(2), rel_tol=1e-4)
    assert all(len(top) == 3 for top in body["top"][1:])
    assert {c["name"] for c in body["compressors"]} == {"gzip", "bz2", "lzma"}
    r = client.post("/v1/score", json={"text": "a☃"})
    assert r.status_code == 400 and "'☃'" in r.json()["error"]["message"]
    r = client.post("/v1/score", json={"text": "x" * 20001})
    assert r.status_code == 400 and "--max-score-chars" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------- batching


def test_a_seeded_stream_is_the_same_alone_and_among_31_others(trained):
    """The target joins a batch whose 31 other streams are mid-way, with other settings."""
    engine = Engine(Generator(trained), max_concurrent=32)
    gen = Generator(trained)
    ids = tuple(gen.prepare_prime(PROMPT))
    spec = StreamSpec(ids, 400, SamplingConfig(0.9, 10, 0.95), seed=99, logprobs=2)
    try:
        alone = _run_streams(engine, [spec])[0]
        others = [StreamSpec(tuple(gen.prepare_prime(PROMPT[:10 + i])), 300 + 7 * i,
                             SamplingConfig([0.0, 0.5, 1.0, 1.5][i % 4], i % 3 * 5, 1.0 - 0.02 * (i % 5)), seed=i)
                  for i in range(31)]
        results: dict = {}
        sink_queue: queue.Queue = queue.Queue()
        engine.submit([Stream(s, i, sink_queue.put) for i, s in enumerate(others)])
        while engine.active < 31:
            time.sleep(0.001)
        engine.submit([Stream(spec, 31, sink_queue.put)])
        results = _collect(sink_queue, 32)
        assert engine.stats.peak_active == 32
        assert results[31] == alone
    finally:
        engine.close()
    assert alone[0] == gen.generate(PROMPT, 400, sampling=spec.sampling, seed=99)


def _run_streams(engine, specs):
    sink_queue: queue.Queue = queue.Queue()
    engine.submit([Stream(s, i, sink_queue.put) for i, s in enumerate(specs)])
    return _collect(sink_queue, len(specs))


def _collect(sink_queue, count):
    texts = {i: [] for i in range(count)}
    logprobs = {i: [] for i in range(count)}
    finished = {}
    while len(finished) < count:
        for piece in sink_queue.get(timeout=30):
            texts[piece.index].append(piece.text)
            logprobs[piece.index].extend(piece.logprobs)
            if piece.finish_reason:
                finished[piece.index] = piece.finish_reason
    return {i: ("".join(texts[i]), logprobs[i], finished[i]) for i in range(count)}


def test_queue_full_is_429_with_retry_after(trained):
    app = create_app(ServeConfig(max_concurrent=1, max_queue=1, max_length=100_000), {"alice": trained})
    with TestClient(app) as c:
        long = {"prompt": PROMPT, "max_tokens": 100_000, "stream": True}
        with c.stream("POST", "/v1/completions", json=long) as first:
            next(first.iter_lines())
            r = c.post("/v1/completions", json={"prompt": PROMPT, "n": 2, "max_tokens": 5})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        deadline = time.monotonic() + 5
        while c.get("/health").json()["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get("/health").json()["active"] == 0
        assert completion(c, prompt=PROMPT, n=2, max_tokens=5)["usage"]["completion_tokens"] == 10


def test_api_key_and_cors(trained):
    app = create_app(ServeConfig(api_key="s3cret", cors_origins=("http://example.org",)), {"alice": trained})
    with TestClient(app) as c:
        body = {"prompt": PROMPT, "max_tokens": 3}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models").status_code == 401
        ok = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        pre = c.options("/v1/completions", headers={"Origin": "http://example.org",
                                                    "Access-Control-Request-Method": "POST"})
        assert pre.headers["access-control-allow-origin"] == "http://example.org"
        other = c.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    with TestClient(create_app(ServeConfig(), {"alice": trained})) as c:   # CORS is off by default
        r = c.get("/health", headers={"Origin": "http://example.org"})
        assert "access-control-allow-origin" not in r.headers


def test_503_while_loading(trained):
    release = threading.Event()

    def loader():
        release.wait(10)
        return {"alice": trained}

    with TestClient(create_app(ServeConfig(), loader=loader)) as c:
        assert c.get("/health").status_code == 503 and c.get("/health").json()["status"] == "loading"
        r = c.post("/v1/completions", json={"prompt": PROMPT})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "loading"
        release.set()
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert completion(c, prompt=PROMPT, max_tokens=4)["choices"][0]["finish_reason"] == "length"


def test_request_time_limit_ends_a_stream_with_abort(trained):
    app = create_app(ServeConfig(max_length=10 ** 6, request_timeout=0.3), {"alice": trained})
    with TestClient(app) as c:
        start = time.monotonic()
        choice = completion(c, prompt=PROMPT, max_tokens=10 ** 6)["choices"][0]
        assert choice["finish_reason"] == "abort" and 0 < len(choice["text"]) < 10 ** 6
        assert time.monotonic() - start < 5


# ----------------------------------------------------------------------------- a live server


@pytest.fixture(scope="module")
def live(checkpoint_file):
    server = LiveServer(checkpoint_file, "--max-length", "200000", "--max-concurrent", "64")
    yield server
    if server.proc.poll() is None:
        server.stop()


def test_live_32_concurrent_clients_batched_and_seeded_equal(live, checkpoint_file):
    trained = checkpoint.load(checkpoint_file)
    target = {"prompt": PROMPT, "max_tokens": 600, "seed": 4242, "temperature": 0.8, "stream": True}
    others = [{"prompt": PROMPT[:5 + i], "max_tokens": 600, "seed": i, "temperature": 1.0, "top_k": i % 7,
               "stream": True} for i in range(31)]

    async def run(bodies):
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as http:
            return await asyncio.gather(*(_stream_text(http, b) for b in bodies))

    alone = asyncio.run(run([target]))[0]
    together = asyncio.run(run(others[:15] + [target] + others[15:]))
    assert together[15] == alone
    assert alone == Generator(trained).generate(PROMPT, 600, sampling=SamplingConfig(0.8), seed=4242)
    peak = httpx.get(live.url + "/v1/models").json()["data"][0]["charlstm"]["peak_active"]
    assert peak >= 16, f"the 32 streams were not batched together (at most {peak} at once)"
    assert live.wait_idle() == 0


async def _stream_text(http: httpx.AsyncClient, body: dict) -> str:
    parts = []
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                parts.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(parts)


def test_live_disconnect_frees_the_slot_and_never_reading_client(live):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 200000, "stream": True}).encode()
    host, port = live.url.removeprefix("http://").split(":")
    for _ in range(3):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert b"200 OK" in sock.recv(4096)
        assert live.active() == 1
        sock.close()                       # mid-stream
        assert live.wait_idle() == 0
    # a client that never reads keeps its slot only until the stream ends; others are served meanwhile
    lazy = socket.create_connection((host, int(port)))
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    small = json.dumps({"prompt": PROMPT, "max_tokens": 5000, "stream": True}).encode()
    lazy.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(small)).encode()
                 + b"\r\n\r\n" + small)
    r = httpx.post(live.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 50}, timeout=10)
    assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 50
    assert live.wait_idle() == 0
    lazy.close()


def test_live_ctrl_c_ends_open_streams_cleanly(checkpoint_file):
    live = LiveServer(checkpoint_file, "--max-length", "200000")
    events: list = []
    got_first = threading.Event()

    def reader():
        with httpx.stream("POST", live.url + "/v1/completions", timeout=30,
                          json={"prompt": PROMPT, "max_tokens": 200000, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    got_first.set()

    thread = threading.Thread(target=reader)
    thread.start()
    assert got_first.wait(10)
    code, out, err = live.stop(signal.SIGINT)
    thread.join(10)
    assert code == 0 and "Traceback" not in err, err
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    assert out.strip().endswith("stopped")


def test_cli_refusals_are_one_line(tmp_path, checkpoint_file, capsys):
    from charlstm.cli import main

    assert main(["serve", str(tmp_path / "missing.safetensors")]) == 2
    assert main(["serve", str(tmp_path)]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(checkpoint_file), "--port", str(taken.getsockname()[1])]) == 2
    assert main(["serve", str(checkpoint_file), "--max-queue", "-1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("charlstm: error: ") for line in err)
    assert "no such checkpoint" in err[0] and "no .safetensors" in err[1] and "cannot listen" in err[2]
    # a file that only loading can find wrong: the server says so in one line and exits 2
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    done = subprocess.run([sys.executable, "-m", "charlstm", "serve", str(bad), "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "bad.safetensors" in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- hostile clients (issue 15)


def test_live_a_crowd_gets_200_or_429_and_a_stalled_body_408(checkpoint_file):
    """100 connections at once against 2 slots and 4 waiting places: each is answered, none
    fails or hangs; a body that never finishes arriving is cut at the time limit."""
    server = LiveServer(checkpoint_file, "--max-concurrent", "2", "--max-queue", "4", "--request-timeout", "5",
                        "--max-length", "2000")
    try:
        async def one(http: httpx.AsyncClient, k: int) -> int:
            r = await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2000, "seed": k})
            if r.status_code == 200:
                assert r.json()["choices"][0]["finish_reason"] == "length"
            else:
                assert r.headers["retry-after"] == "1"
            return r.status_code

        async def crowd() -> list[int]:
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
                return await asyncio.gather(*(one(http, k) for k in range(100)))

        statuses = asyncio.run(crowd())
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 6 and 429 in statuses
        assert server.wait_idle() == 0
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
            assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 5}, timeout=10)
        assert r.status_code == 200
    finally:
        server.stop()


def test_surrogates_and_huge_numbers_are_refused_not_crashed(client):
    r = client.post("/v1/completions", content=b'{"prompt": "\\ud800abc"}')
    assert r.status_code == 400 and "\\ud800" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b'{"prompt": "a", "temperature": 1e999}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = client.post("/v1/completions", content=b'{"prompt": "a", "max_tokens": 1e999}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = client.post("/v1/completions", json={"prompt": PROMPT, "x" * 5000: 1})
    assert r.status_code == 400 and len(r.json()["error"]["param"]) <= 60


def test_window_models_are_served_as_the_generator_runs_them(alice):
    """A model trained on windows (the tutorial's, and imported Keras files) re-reads its last
    ``window`` characters each step; the server batches rows whose windows are equally long."""
    torch.manual_seed(3)
    vocab = Vocab.from_text(alice)
    config = ModelConfig(vocab_size=len(vocab), units=32, embedding_dim=8, target="last", window=20)
    trained = TrainedModel(CharLSTM(config).eval(), vocab)
    with TestClient(create_app(ServeConfig(), {"window": trained})) as c:
        bodies = [{"prompt": PROMPT[:8 + i], "max_tokens": 60, "seed": i, "temperature": 0.7 + 0.1 * i,
                   "logprobs": 1, "echo": i == 2} for i in range(4)]
        alone = [completion(c, **b)["choices"][0] for b in bodies]
        together = completion(c, prompt=[b["prompt"] for b in bodies[:2]], n=1, max_tokens=60, seed=0,
                              temperature=0.7)["choices"]
    gen = Generator(trained)
    assert gen.resolve_mode("auto") == "window"
    for i, b in enumerate(bodies):
        expected = gen.generate(b["prompt"], 60, sampling=SamplingConfig(b["temperature"]), seed=i)
        assert alone[i]["text"] == (b["prompt"] if b["echo"] else "") + expected
    assert together[0]["text"] == alone[0]["text"]
