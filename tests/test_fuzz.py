"""Fuzz every socket the roles listen on with real bad bytes: malformed, truncated, oversized and
wrong-version frames, junk multipart, unexpected message types, and raw non-ZMTP TCP garbage.
Zero crashes, and every rejected frame counted by reason."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
import urllib.request

import msgspec
import zmq
from conftest import free_port, himac_cmd, start, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_protocol import make_group

from himac.protocol import PROTOCOL_VERSION, Ack, Hello, Rejected, Welcome, decode, encode

FRAMES_PER_SOCKET = 10_000
MAX_BYTES = 1 << 20  # the configured max message size on both roles


def rejected(port: int, metric: str, label: str) -> dict[str, float]:
    """Counts of a `*_frames_rejected_total` metric, by (label value, reason)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == metric:
                key = f"{s.labels[label]}/{s.labels['reason']}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def bad_frames(n: int, rng: random.Random, max_bytes: int, valid: bytes, unexpected: bytes):
    """Yield (parts, reason): every kind of bad frame, deterministically mixed. The reason the receiver must
    count is what the contract's own ``decode`` says (random bytes can happen to be a msgpack map without a
    version, say); a frame that decodes is a message this socket does not take: "unexpected"."""
    wrong_version = msgspec.msgpack.encode({**msgspec.msgpack.decode(valid), "v": PROTOCOL_VERSION + 7})
    for i in range(n):
        kind = i % 8
        if kind == 0:
            frame = rng.randbytes(rng.randrange(0, 200))
        elif kind == 1:
            frame = valid[:rng.randrange(1, len(valid))]  # truncated
        elif kind == 2:
            frame = wrong_version
        elif kind == 3:  # oversized, but not too many: each is over the limit
            frame = b"\x00" * (max_bytes + 1 + rng.randrange(1000)) if i % 80 == 3 else rng.randbytes(3)
        elif kind == 4:
            frame = b"\x81\xa4type\xa5hello"  # right shape, missing fields
        elif kind == 5:
            frame = unexpected  # valid, but not a message this socket takes
        elif kind == 6:
            frame = msgspec.msgpack.encode({"type": "credit", "credits": 1})  # no version
        else:
            frame = bytes([rng.randrange(256)]) * rng.randrange(1, 64)
        try:
            decode(frame, max_bytes)
            reason = "unexpected"
        except Rejected as e:
            reason = e.reason
        yield [frame], reason


def send_paced(sock, frames, pace: int = 200) -> dict[str, int]:
    expected: dict[str, int] = {}
    for i, (parts, reason) in enumerate(frames):
        sock.send_multipart(parts)
        expected[reason] = expected.get(reason, 0) + 1
        if i % pace == pace - 1:
            time.sleep(0.01)  # stay under ZeroMQ's high-water marks: a dropped frame would be uncounted
    return expected


def raw_tcp_garbage(port: int, n: int, rng: random.Random) -> None:
    """Not even ZMTP: ZeroMQ must drop these connections without disturbing the process."""
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(rng.randbytes(rng.randrange(1, 512)))


def test_learner_survives_fuzz_on_every_socket(tiny_model, tmp_path):
    rng = random.Random(1)
    ports = {k: free_port() for k in ("data", "pub", "weights", "metrics")}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""out: {tmp_path}
model: {tiny_model}
learner: {{port: {ports['data']}, pub_port: {ports['pub']}, weights_port: {ports['weights']}, weights_transport: zmq,
          max_message_bytes: {MAX_BYTES}, steps: 5}}
""")
    learner = start(himac_cmd("learner", "--config", str(cfg), "--quiet", "--metrics-port", str(ports["metrics"])),
                    tmp_path / "learner.log")
    ctx = zmq.Context.instance()
    try:
        wait_for(lambda: (tmp_path / "learner.json").exists(), 240, "the learner to listen", procs=[learner])
        valid = encode(make_group())
        data = ctx.socket(zmq.DEALER)
        data.setsockopt(zmq.LINGER, 0)
        data.connect(f"tcp://127.0.0.1:{ports['data']}")
        exp_data = send_paced(data, bad_frames(FRAMES_PER_SOCKET, rng, MAX_BYTES,
                                               valid, encode(Ack(group_id="x", status="accepted"))))
        weights = ctx.socket(zmq.DEALER)
        weights.setsockopt(zmq.LINGER, 0)
        weights.connect(f"tcp://127.0.0.1:{ports['weights']}")
        exp_weights = send_paced(weights, bad_frames(FRAMES_PER_SOCKET, rng, 1 << 16, encode(
            Hello(actor_id="a", incarnation="i")), encode(Hello(actor_id="a", incarnation="i"))))
        junk = [rng.randbytes(10) for _ in range(3)]
        data.send_multipart(junk)  # more parts than a message has
        exp_data["malformed"] += 1

        def counted():
            got = rejected(ports["metrics"], "himac_learner_frames_rejected_total", "socket")
            want = {f"data/{r}": n for r, n in exp_data.items()} | {f"weights/{r}": n for r, n in exp_weights.items()}
            return got == want and got
        got = wait_for(counted, 60, "every fuzz frame to be counted", procs=[learner])
        assert sum(got.values()) >= 2 * FRAMES_PER_SOCKET
        # raw garbage below ZMTP: ZeroMQ drops most connections; bytes that happen to parse as a legacy
        # ZMTP/1.0 stream reach the learner as frames and are counted as malformed (so not an exact count)
        for port in (ports["data"], ports["pub"], ports["weights"]):
            raw_tcp_garbage(port, 100, rng)
        # still alive and serving: a real hello gets a welcome
        data.send(encode(Hello(actor_id="after-fuzz", incarnation="1")))
        assert data.poll(5000) and isinstance(decode(data.recv()), Welcome)
        assert learner.poll() is None
        print(f"\nlearner fuzz: rejected by socket/reason {json.dumps(got)}")
    finally:
        os.killpg(learner.pid, signal.SIGKILL)
        learner.wait()


def test_actor_survives_fuzz_from_a_hostile_learner(tiny_model, tmp_path):
    rng = random.Random(2)
    ctx = zmq.Context.instance()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for s in (router, pub):
        s.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    metrics_port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"out: {tmp_path}\nmodel: {tiny_model}\nactor: {{max_message_bytes: {MAX_BYTES}, heartbeat_s: 60}}\n")
    actor = start(himac_cmd("actor", "--config", str(cfg), "--learner", f"tcp://127.0.0.1:{port}", "--actor-id", "a0",
                            "--metrics-port", str(metrics_port)), tmp_path / "actor.log")
    try:
        assert router.poll(240_000), "the actor never said hello"
        ident, hello = router.recv_multipart()
        assert isinstance(decode(hello), Hello)
        router.send_multipart([ident, encode(Welcome(learner_id="evil", pub_port=pub_port, credits=0))])
        time.sleep(2)  # the actor subscribes to our PUB after the welcome
        unexpected = encode(Hello(actor_id="x", incarnation="y"))
        valid = encode(Welcome(learner_id="evil", pub_port=pub_port, credits=0))
        exp_router = send_paced(_Prefixed(router, ident), bad_frames(FRAMES_PER_SOCKET, rng, MAX_BYTES, valid,
                                                                     unexpected))
        exp_pub = send_paced(pub, bad_frames(FRAMES_PER_SOCKET, rng, MAX_BYTES, valid, unexpected))

        def counted():
            got = rejected(metrics_port, "himac_actor_frames_rejected_total", "source")
            want = {f"router/{r}": n for r, n in exp_router.items()} | {f"pub/{r}": n for r, n in exp_pub.items()}
            return got == want and got
        got = wait_for(counted, 60, "every fuzz frame to be counted", procs=[actor])
        raw_tcp_garbage(metrics_port, 50, rng)  # the one port an actor listens on: HTTP
        time.sleep(0.5)
        assert actor.poll() is None
        assert urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5).status == 200
        print(f"\nactor fuzz: rejected by source/reason {json.dumps(got)}")
    finally:
        os.killpg(actor.pid, signal.SIGKILL)
        actor.wait()
        router.close(0)
        pub.close(0)


class _Prefixed:
    """A ROUTER that addresses every frame to one peer."""

    def __init__(self, sock, ident: bytes):
        self.sock, self.ident = sock, ident

    def send_multipart(self, parts):
        self.sock.send_multipart([self.ident, *parts])
