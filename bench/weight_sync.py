"""Weight sync: seconds from "publish version v" to "all K actors hold v", per transport and model size.

The real code paths, end to end:

  learner  snapshot (``clone`` of the state dict, as ``learner/main.py`` does) -> ``serialize`` ->
           ``DiskPublisher.publish`` (write + fsync + rename + sha256) or ``ZmqPublisher.publish``
           (sha256; the bytes are then served in chunks by its ROUTER thread)
  actors   ``fetch_payload`` (read the file / FetchWeights over ZMQ, sha256 verify) ->
           ``safetensors.torch.load`` -> ``model.load_state_dict(strict=False)`` (as
           ``TransformersBackend.load_weights``)

Actors are separate *processes* (spawn), each holding its own model; they start fetching the moment
the announcement is handed to them (here over a multiprocessing pipe, not the learner's PUB socket:
the announcement itself is a few hundred bytes). Times are ``time.monotonic()`` (one clock for
all processes). sha256 time is measured inside ``fetch_payload`` / ``publish`` by wrapping the
``hashlib`` they use. The disk transport reads a file the learner just wrote: it is served from
the page cache (learner and actors share one host here).

Bounds: one copy of the payload at the measured memcpy bandwidth (disk, page cache) or at the
measured ZMQ tcp loopback bandwidth (zmq; the publisher serves actors one chunk at a time, so
K actors need K x size through one socket).

Two extra, non-contract variants, timed after each publish (not in "all hold"):
- actor "views": on the same fetched bytes, parse the safetensors header and hand
  ``load_state_dict`` zero-copy ``torch.frombuffer`` views instead of ``safetensors.torch.load``'s copies;
- learner "one-pass serialise": write the safetensors bytes straight from the live parameters into
  one buffer (dtype conversion in the copy), fresh and reused, instead of ``clone`` + ``serialize``.

    python bench/weight_sync.py --model tiny
    python bench/weight_sync.py --model 0.5b --dtype bf16 --actors 2 --reps 3
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time

GB = 1e9

MODELS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=600, tie_word_embeddings=True, max_position_embeddings=4096),
    # Qwen2.5-0.5B's shape
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768),
}
PROBE = "model.layers.0.self_attn.q_proj.weight"


class TimedHashlib:
    """Stands in for the ``hashlib`` module inside the publisher / weights modules: times sha256."""

    def __init__(self):
        self.seconds = 0.0

    def sha256(self, data=b""):
        t0 = time.perf_counter()
        h = hashlib.sha256(data)
        self.seconds += time.perf_counter() - t0
        return h


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_model(model: str, dtype: str, init: bool):
    """A Qwen2ForCausalLM of the given shape; random N(0, 0.02) weights if ``init`` else uninitialised."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**MODELS[model])
    with torch.device("meta"):
        m = Qwen2ForCausalLM(cfg)
    m = m.to_empty(device="cpu").to(torch_dtype(dtype))
    m.tie_weights()
    if init:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
    m.eval()
    return m, cfg


def safetensors_views(buf) -> dict:
    """Zero-copy tensors over a safetensors payload (bytes / bytearray): header parse + frombuffer."""
    import torch

    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
              "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    mv = memoryview(buf)
    n = int.from_bytes(mv[:8], "little")
    header = json.loads(bytes(mv[8:8 + n]))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dt = dtypes[info["dtype"]]
        t = torch.frombuffer(mv[base + a:base + b], dtype=dt) if b > a else torch.empty(0, dtype=dt)
        out[name] = t.reshape(info["shape"])
    return out


ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64", "int32": "I32", "uint8": "U8",
             "bool": "BOOL"}


def serialize_direct(state_dict: dict, dtype=None, out: bytearray | None = None) -> bytearray:
    """Variant (not the contract's code): safetensors bytes written in one pass - each tensor converted
    straight into one buffer (``out`` when given and large enough: reuse it across versions) - instead of
    ``clone`` + ``serialize`` (which converts, copies to bytes per tensor, then joins). The buffer is
    itself a snapshot, so the learner's clone is not needed. Tied weights are written once, as serialize."""
    import torch

    seen, items, header, off = set(), [], {}, 0
    for name, t in state_dict.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
        n = t.numel() * torch.empty(0, dtype=dt).element_size()
        header[name] = {"dtype": ST_DTYPES[str(dt).removeprefix("torch.")], "shape": list(t.shape),
                        "data_offsets": [off, off + n]}
        items.append((name, t, dt, off, n))
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    total = 8 + len(h) + off
    if out is None or len(out) < total:
        out = bytearray(total)
    elif len(out) > total:
        del out[total:]
    out[:8] = len(h).to_bytes(8, "little")
    out[8:8 + len(h)] = h
    base = 8 + len(h)
    flat = torch.frombuffer(out, dtype=torch.uint8)
    with torch.no_grad():
        for name, t, dt, a, n in items:
            if n:
                flat[base + a:base + a + n].view(dt).view(t.shape).copy_(t.detach())
    return out


# ------------------------------------------------------------------------------------ the actors
def actor_main(idx: int, model: str, dtype: str, inbox, outbox, threads: int) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    torch.set_num_threads(threads)
    import himac.actor.weights as W
    from himac.protocol import decode
    from safetensors.torch import load

    shim = TimedHashlib()
    W.hashlib = shim
    m, _ = build_model(model, dtype, init=False)
    outbox.put(("ready", idx, {}))
    data = None
    while True:
        cmd, arg = inbox.get()
        if cmd == "stop":
            return
        if cmd == "ann":
            data = None
            ann = decode(arg["ann"])
            r = {"t_recv": time.monotonic()}
            shim.seconds = 0.0
            t0 = time.perf_counter()
            data = W.fetch_payload(ann, timeout_s=600)
            t1 = time.perf_counter()
            tensors = load(data)
            t2 = time.perf_counter()
            missing, unexpected = m.load_state_dict(tensors, strict=False)
            t3 = time.perf_counter()
            r["t_done"] = time.monotonic()
            del tensors
            r.update(fetch_s=t1 - t0 - shim.seconds, sha256_s=shim.seconds, deserialize_s=t2 - t1, load_s=t3 - t2)
            sd = m.state_dict()
            r["ok"] = (not unexpected and set(missing) <= {"lm_head.weight"}
                       and sd[PROBE].flatten()[:8].float().tolist() == arg["probe"]
                       and m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr())
            outbox.put(("held", idx, r))
        elif cmd == "views":  # the same bytes again, through zero-copy views instead of load()
            t0 = time.perf_counter()
            views = safetensors_views(data)
            t1 = time.perf_counter()
            m.load_state_dict(views, strict=False)
            t2 = time.perf_counter()
            del views
            outbox.put(("views", idx, {"deserialize_s": t1 - t0, "load_s": t2 - t1}))


def check_direct(buf, model, dtype) -> bool:
    """serialize_direct's bytes load with safetensors and equal the model's tensors."""
    import torch
    from safetensors import safe_open

    sd = model.state_dict()
    n = int.from_bytes(bytes(buf[:8]), "little")
    names = [k for k in json.loads(bytes(buf[8:8 + n])) if k != "__metadata__"]
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:  # safetensors' own reader on the file
        f.write(buf)
        f.flush()
        with safe_open(f.name, "pt") as st:
            for k in names:
                if not torch.equal(st.get_tensor(k), sd[k].to(dtype if sd[k].is_floating_point() else sd[k].dtype)):
                    return False
    return True


# ------------------------------------------------------------------------------------------ bounds
def memcpy_gbps(nbytes: int, reps: int = 3) -> tuple[float, float]:
    """(into a reused buffer, into a fresh buffer) GB/s for a copy of ``nbytes``."""
    import numpy as np

    src = np.ones(nbytes, np.uint8)
    dst = np.ones(nbytes, np.uint8)
    reused, fresh = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        reused.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bytearray(memoryview(src))
        fresh.append(time.perf_counter() - t0)
    return nbytes / min(reused) / GB, nbytes / min(fresh) / GB


def tcp_gbps(nbytes: int, n: int = 4) -> float:
    """ZMQ DEALER -> ROUTER over tcp://127.0.0.1, one message of ``nbytes`` at a time, sender thread."""
    import zmq

    ctx = zmq.Context.instance()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    payload = b"\1" * nbytes

    def send():
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.SNDHWM, 2)
        s.connect(f"tcp://127.0.0.1:{port}")
        for _ in range(n + 1):
            s.send(payload, copy=False)
        s.close(linger=-1)

    th = threading.Thread(target=send, daemon=True)
    th.start()
    r.recv_multipart(copy=False)
    t0 = time.perf_counter()
    for _ in range(n):
        r.recv_multipart(copy=False)
    dt = time.perf_counter() - t0
    th.join()
    r.close()
    return n * nbytes / dt / GB


# ------------------------------------------------------------------------------------------- main
def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import himac.learner.publisher as P
    from himac.protocol import encode

    shim = TimedHashlib()
    P.hashlib = shim
    work = tempfile.mkdtemp(prefix="himac-weight-sync-", dir=args.workdir)
    ctx = mp.get_context("spawn")
    outbox = ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(args.actors)]
    procs = [ctx.Process(target=actor_main, args=(i, args.model, args.dtype, inboxes[i], outbox, args.actor_threads),
                         daemon=True) for i in range(args.actors)]
    for p in procs:
        p.start()
    try:
        t0 = time.perf_counter()
        model, cfg = build_model(args.model, args.learner_dtype, init=True)
        model_dir = os.path.join(work, "model")
        cfg.save_pretrained(model_dir)
        build_s = time.perf_counter() - t0
        for _ in procs:
            kind, _, _ = outbox.get(timeout=900)
            assert kind == "ready"
        payload_dtype = torch_dtype(args.dtype)
        n_params = sum(p.numel() for p in model.parameters())
        size = 0
        probe = model.state_dict()[PROBE].flatten()[:8].to(payload_dtype).float().tolist()
        res: dict = {"model": args.model, "params": n_params, "payload_dtype": args.dtype,
                     "learner_dtype": args.learner_dtype, "actors": args.actors, "actor_kind": "process (spawn)",
                     "build_s": build_s, "runs": {}}
        version = 0
        direct_checked = False
        for transport in args.transports:
            if transport == "disk":
                pub = P.DiskPublisher(os.path.join(work, "weights"), model_dir)
            else:
                pub = P.ZmqPublisher("127.0.0.1", 0, "127.0.0.1", keep=1)
            runs = []
            for _ in range(args.reps):
                version += 1
                shim.seconds = 0.0
                t_start = time.monotonic()
                p0 = time.perf_counter()
                sd = {k: v.clone() for k, v in model.state_dict().items()}  # tied: both names, one clone each
                p1 = time.perf_counter()
                payload = P.serialize(sd, payload_dtype)
                p2 = time.perf_counter()
                del sd
                ann = pub.publish(payload, version, "flat", "bench")
                p3 = time.perf_counter()
                size = len(payload)
                del payload
                t_ann = time.monotonic()
                frame = encode(ann)
                for q in inboxes:
                    q.put(("ann", {"ann": frame, "probe": probe}))
                held = [outbox.get(timeout=1800) for _ in procs]
                assert all(k == "held" for k, _, _ in held), held
                actors = [r for _, _, r in held]
                for q in inboxes:
                    q.put(("views", None))
                views = [outbox.get(timeout=1800)[2] for _ in procs]
                # learner variant, after the actors are done (no contention): one-pass serialise
                d0 = time.perf_counter()
                direct = serialize_direct(model.state_dict(), payload_dtype)
                d1 = time.perf_counter()
                direct = serialize_direct(model.state_dict(), payload_dtype, out=direct)
                d2 = time.perf_counter()
                if not direct_checked:
                    direct_checked = check_direct(direct, model, payload_dtype)
                del direct
                run_ = {
                    "snapshot_s": p1 - p0, "serialize_s": p2 - p1, "publish_s": p3 - p2 - shim.seconds,
                    "publish_sha256_s": shim.seconds, "learner_s": t_ann - t_start,
                    "all_hold_s": max(a["t_done"] for a in actors) - t_start,
                    "actors_s": max(a["t_done"] for a in actors) - t_ann,
                    "ok": all(a["ok"] for a in actors),
                    **{k: statistics.median(a[k] for a in actors) for k in
                       ("fetch_s", "sha256_s", "deserialize_s", "load_s")},
                    "views_deserialize_s": statistics.median(v["deserialize_s"] for v in views),
                    "views_load_s": statistics.median(v["load_s"] for v in views),
                    "direct_fresh_s": d1 - d0, "direct_reused_s": d2 - d1,
                }
                runs.append(run_)
            pub.close()
            res["runs"][transport] = runs
        res["payload_bytes"] = size
        res["direct_checked"] = direct_checked
        res["memcpy_gbps"], res["memcpy_fresh_gbps"] = memcpy_gbps(min(size, 1 << 30))
        res["tcp_gbps"] = tcp_gbps(min(size, 256 << 20), n=4)
    finally:
        for q in inboxes:
            q.put(("stop", None))
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        shutil.rmtree(work, ignore_errors=True)
    return res


def report(res: dict) -> str:
    size = res["payload_bytes"]
    K = res["actors"]
    print(f"model {res['model']}: {res['params'] / 1e6:.1f}M params, payload {size / 1e6:.1f} MB "
          f"({res['payload_dtype']}), {K} actor process(es); memcpy {res['memcpy_gbps']:.2f} GB/s "
          f"(fresh buffer {res['memcpy_fresh_gbps']:.2f}), zmq tcp loopback {res['tcp_gbps']:.2f} GB/s")
    cols = ["snapshot_s", "serialize_s", "publish_s", "publish_sha256_s", "fetch_s", "sha256_s", "deserialize_s",
            "load_s", "all_hold_s"]
    names = ["snapshot", "serialise", "write/serve", "sha(pub)", "fetch", "sha(act)", "deser", "load_sd", "ALL HOLD"]
    print(f"  {'transport':<9}" + "".join(f"{n:>12}" for n in names) + f"{'bound':>10}{'x bound':>9}")
    summary = []
    for transport, runs in res["runs"].items():
        extra = ["views_deserialize_s", "views_load_s", "direct_fresh_s", "direct_reused_s"]
        med = {c: statistics.median(r[c] for r in runs) for c in cols + extra}
        bound = size / (res["memcpy_gbps"] * GB) if transport == "disk" else K * size / (res["tcp_gbps"] * GB)
        med["bound_s"] = bound
        res.setdefault("median", {})[transport] = med
        ok = all(r["ok"] for r in runs)
        print(f"  {transport:<9}" + "".join(f"{med[c]:12.3f}" for c in cols)
              + f"{bound:10.3f}{med['all_hold_s'] / bound:9.0f}" + ("" if ok else "  WEIGHTS MISMATCH"))
        print(f"  {'':<9}  variants: actor zero-copy views: deserialise {med['views_deserialize_s']:.3f} s + load_sd "
              f"{med['views_load_s']:.3f} s (vs {med['deserialize_s'] + med['load_s']:.3f} s via safetensors load); "
              f"learner one-pass serialise: {med['direct_fresh_s']:.3f} s fresh buffer, {med['direct_reused_s']:.3f} s "
              f"reused (vs {med['snapshot_s'] + med['serialize_s']:.3f} s snapshot + serialise)")
        summary.append(f"{transport} {med['all_hold_s']:.2f} s ({med['all_hold_s'] / bound:.0f}x bound)")
    line = (f"weight_sync {res['model']} ({size / 1e6:.0f} MB {res['payload_dtype']}, {K} actors): "
            + ", ".join(summary) + f"; medians of {len(next(iter(res['runs'].values())))} publishes, seconds")
    if not res.get("direct_checked"):
        print("  WARNING: the one-pass serialise variant did not reproduce the tensors")
    print(line)
    return line


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu or platform.processor(), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="payload dtype (serialize(..., dtype)) and the actors' model dtype")
    ap.add_argument("--learner-dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="publishes per transport (median)")
    ap.add_argument("--transports", nargs="+", default=["disk", "zmq"], choices=["disk", "zmq"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, learner (1: on a shared 2-core box, OpenMP wake-ups dominate small copies)")
    ap.add_argument("--actor-threads", type=int, default=1, help="torch threads per actor")
    ap.add_argument("--workdir", default=None, help="where the disk transport writes (default: $TMPDIR)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    m = machine()
    print(f"machine: {m['nproc']} CPU(s), {m['cpu']}; python {m['python']}")
    res = run(args)
    res["machine"] = m
    res["summary"] = report(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
