"""Serve mode beside its peers (`benchmarks/run.py`, or `run.py --only serve` for this part alone).

Every server gets the same model file, is pinned to core 0 (``taskset -c 0``, ``OMP_NUM_THREADS=1``) and is
loaded from core 1 by a load generator in C: wrk (Debian's ``wrk``, ``wrk_post.lua``) for OIP v2 REST, and
h2load (Debian's ``nghttp2-client``) for OIP v2 gRPC: one HTTP/2 connection per caller, each sending the same
length-prefixed ``ModelInfer`` message back to back (a Python gRPC client used before saturated its core near
2k calls/s, below what our server answers). h2load does not read gRPC trailers, so a point also checks that the
DATA bytes received are exactly one successful answer's per request (an error answers with trailers only, no
data) and takes p50/p99 from its per-request log. The same request bodies
for all (FP64 tensors of 1 and 100 rows), at 1, 8 and 32 connections, each point a short warm-up then
``seconds`` measured. Before timing, every server's REST and gRPC answers are checked against
``Booster.predict`` on the same rows. The peers each run in their own venv under .bench/, made from the
pinned files ``benchmarks/requirements-{mlserver,kserve}.txt``:

- **MLServer** 1.7.1 with ``mlserver-lightgbm``: its defaults (only the ports set), and the best configuration
  found on this machine (``MLSERVER_BEST`` below: inference in the server process, no per-request debug log,
  no metrics server; its adaptive batching made no point faster here).
- **KServe** 0.21's Python model server with ``kserve_peer.py`` (what ``lgbserver`` does).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import IO

import lightgbm as lgb
import numpy as np
import orjson

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROWS = (1, 100)
CONNS = (1, 8, 32)
SERVER_CORE, LOAD_CORE = "0", "1"
BENCH_LOGS = tempfile.gettempdir()  # each server's output, for a start-up failure's reason
MLSERVER_BEST = {"parallel_workers": 0, "debug": False, "metrics_endpoint": None}


@dataclass
class Server:
    name: str
    argv: list[str]
    http: int
    grpc: int
    proc: subprocess.Popen | None = None
    workdir: str | None = None
    log: IO[bytes] | None = None
    points: dict = field(default_factory=dict)  # (proto, rows, conns) -> {"rps", "p50_ms", "p99_ms"}
    grpc_reply: dict = field(default_factory=dict)  # rows -> bytes of the server's gRPC answer (check() reads it)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv(bench: str, name: str) -> str:
    """The python of the peer venv ``name`` (created from benchmarks/requirements-NAME.txt when missing)."""
    bench = os.path.abspath(bench)
    python = f"{bench}/{name}-venv/bin/python"
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", f"{bench}/{name}-venv"], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "-r", f"{HERE}/requirements-{name}.txt"], check=True)
    return python


def ours(model: str) -> Server:
    http, grpc = free_port(), free_port()
    return Server("ours", [sys.executable, "-m", "workers", "serve", "--model", model, "--port", str(http),
                           "--grpc-port", str(grpc), "--model-name", "m", "--host", "127.0.0.1"], http, grpc)


def ours_compiled(bench: str, model: str) -> Server:
    """Ours with the compiled backend (lleaves; the compiled model cached under ``bench``/cache)."""
    server = ours(model)
    server.name = "ours, lleaves"
    server.argv += ["--backend", "lleaves", "--cache-dir", f"{os.path.abspath(bench)}/cache"]
    return server


def baseline(model: str) -> Server:
    """Ours before #19's fixes (asyncio + h11, no gc.freeze): ``ours_baseline.py``."""
    server = ours(model)
    server.name = "ours before #19"
    server.argv = [sys.executable, f"{HERE}/ours_baseline.py", *server.argv[4:]]
    return server


def mlserver(bench: str, model: str, best: bool) -> Server:
    bench, model = os.path.abspath(bench), os.path.abspath(model)
    python = venv(bench, "mlserver")
    http, grpc = free_port(), free_port()
    workdir = tempfile.mkdtemp(prefix="mlserver-", dir=bench)
    settings: dict = {"http_port": http, "grpc_port": grpc, "metrics_port": free_port(), "host": "127.0.0.1"}
    if best:
        settings |= MLSERVER_BEST
    os.makedirs(f"{workdir}/m")
    with open(f"{workdir}/settings.json", "w") as f:
        json.dump(settings, f)
    with open(f"{workdir}/m/model-settings.json", "w") as f:
        json.dump({"name": "m", "implementation": "mlserver_lightgbm.LightGBMModel",
                   "parameters": {"uri": os.path.abspath(model)}}, f)
    name = "MLServer (best here)" if best else "MLServer (default)"
    return Server(name, [os.path.join(os.path.dirname(python), "mlserver"), "start", workdir], http, grpc,
                  workdir=workdir)


def kserve(bench: str, model: str) -> Server:
    python = venv(bench, "kserve")
    http, grpc = free_port(), free_port()
    return Server("KServe", [python, f"{HERE}/kserve_peer.py", model, str(http), str(grpc)], http, grpc)


def start(server: Server, timeout: float = 120) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if server.name.startswith("ours"):
        env["PYTHONPATH"] = ROOT
    else:
        env.pop("PYTHONPATH", None)  # the peers import only their own venv
    server.log = open(os.path.join(BENCH_LOGS, "serve-" + "".join(c for c in server.name.lower() if c.isalnum()) + ".log"), "wb")
    server.proc = subprocess.Popen(["taskset", "-c", SERVER_CORE, *server.argv], stdout=server.log,
                                   stderr=subprocess.STDOUT, env=env, cwd=server.workdir or ROOT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} before it was ready "
                               f"(see {server.log.name})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.http}/v2/models/m/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{server.name} not ready within {timeout:.0f} s (see {server.log.name})")


def stop(server: Server) -> None:
    if server.proc is not None:
        server.proc.terminate()
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
    if server.log is not None:
        server.log.close()
    if server.workdir:
        shutil.rmtree(server.workdir, ignore_errors=True)


def rest_body(x: np.ndarray) -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP64",
                                     "data": x.ravel().tolist()}]})


def grpc_body(x: np.ndarray) -> bytes:
    from workers.decode.oip_proto import open_inference_grpc_pb2 as pb

    req = pb.ModelInferRequest(model_name="m")
    tensor = req.inputs.add(name="x", datatype="FP64", shape=list(x.shape))
    tensor.contents.fp64_contents.extend(x.ravel().tolist())
    return req.SerializeToString()


def check(server: Server, x: np.ndarray, expected: np.ndarray) -> None:
    """Both protocols of ``server`` answer what Booster.predict does on ``x`` (else the benchmark stops)."""
    import grpc

    from workers.decode.oip_proto import open_inference_grpc_pb2 as pb

    req = urllib.request.Request(f"http://127.0.0.1:{server.http}/v2/models/m/infer", data=rest_body(x),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        got = np.asarray(orjson.loads(r.read())["outputs"][0]["data"], dtype=np.float64).ravel()
    assert np.allclose(got, expected, rtol=0, atol=1e-9), f"{server.name} REST answers differ from Booster.predict"
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc}") as ch:
        raw = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(grpc_body(x), timeout=30)
    server.grpc_reply[x.shape[0]] = len(raw)
    resp = pb.ModelInferResponse.FromString(raw)
    if resp.raw_output_contents:
        got = np.frombuffer(resp.raw_output_contents[0], dtype=np.float64)
    else:
        got = np.asarray(resp.outputs[0].contents.fp64_contents, dtype=np.float64)
    assert np.allclose(got, expected, rtol=0, atol=1e-9), f"{server.name} gRPC answers differ from Booster.predict"


def load(proto: str, server: Server, body_file: str, conns: int, seconds: float, warmup: float) -> dict:
    """One point: requests/s, p50 and p99 (ms) from the load generator on core 1. Any error fails the point."""
    pin = ["taskset", "-c", LOAD_CORE]
    if proto == "REST":
        url = f"http://127.0.0.1:{server.http}/v2/models/m/infer"
        env = dict(os.environ, WRK_BODY=body_file)
        wrk = [*pin, "wrk", "-t1", f"-c{conns}", "--timeout", "30s", "-s", f"{HERE}/wrk_post.lua", url]
        if warmup > 0:
            subprocess.run([*wrk, "-d", f"{max(1, round(warmup))}s"], capture_output=True, env=env, check=True)
        out = subprocess.run([*wrk, "-d", f"{max(1, round(seconds))}s"], capture_output=True, text=True, env=env,
                             check=True)
        line = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("JSON "))[5:])
        assert line["non2xx"] == 0 and line["errors"] == 0, f"{server.name} REST {conns} conns: {line}"
        return {"rps": line["requests"] / (line["duration_us"] / 1e6), "p50_ms": line["p50_us"] / 1000,
                "p99_ms": line["p99_us"] / 1000}
    rows = int(os.path.basename(body_file).rsplit("-", 1)[1])
    url = f"http://127.0.0.1:{server.grpc}/inference.GRPCInferenceService/ModelInfer"
    framed = f"{body_file}.h2"
    if not os.path.exists(framed):  # gRPC's framing: no compression flag, 4-byte big-endian length
        body = open(body_file, "rb").read()
        with open(framed, "wb") as f:
            f.write(b"\0" + struct.pack(">I", len(body)) + body)
    h2 = [*pin, "h2load", "-n", "0", "-c", str(conns), "-m", "1", "-d", framed, "-H", "content-type: application/grpc",
          "-H", "te: trailers"]
    if warmup > 0:
        subprocess.run([*h2, "-D", str(max(1, round(warmup))), url], capture_output=True, check=True)
    log_file = f"{framed}.log"
    out = subprocess.run([*h2, "-D", str(max(1, round(seconds))), "--log-file", log_file, url], capture_output=True,
                         text=True, check=True).stdout
    done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out).group(2))
    data = int(re.search(r"\((\d+)\) data", out).group(1))
    took = float(re.search(r"finished in ([0-9.]+)s", out).group(1))
    want = done * (5 + server.grpc_reply[rows])
    assert data == want, f"{server.name} gRPC {conns} conns: {data} data bytes for {done} answers, {want} expected"
    with open(log_file) as f:
        times = sorted(int(line.split("\t")[2]) for line in f if line.strip())
    os.remove(log_file)
    return {"rps": done / took, "p50_ms": times[len(times) // 2] / 1000,
            "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] / 1000}


def raw_rate(model: str, rows: int, seconds: float = 3.0) -> float:
    """Booster.predict rows/s at ``rows`` rows per call on the server's core, one thread: the ceiling."""
    code = ("import sys, time, numpy as np, lightgbm as lgb\n"
            "b = lgb.Booster(model_file=sys.argv[1]); n = int(sys.argv[2])\n"
            "x = np.random.default_rng(9).normal(size=(n, b.num_feature()))\n"
            "b.predict(x, num_threads=1); done, t = 0, time.perf_counter()\n"
            "while time.perf_counter() - t < float(sys.argv[3]):\n"
            "    b.predict(x, num_threads=1); done += n\n"
            "print(done / (time.perf_counter() - t))\n")
    out = subprocess.run(["taskset", "-c", SERVER_CORE, sys.executable, "-c", code, model, str(rows), str(seconds)],
                         capture_output=True, text=True, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return float(out.stdout.strip())


def run(bench: str, model: str, seconds: float = 5.0, warmup: float = 1.0,
        names: list[str] | None = None) -> tuple[list[Server], dict[int, float]]:
    """Every server through every point; returns the servers (with their points) and the raw Booster.predict
    rows/s per row count on the servers' core (mean of a measurement before the points and one after each
    row count's REST points)."""
    bench, model = os.path.abspath(bench), os.path.abspath(model)
    makers = {"ours": lambda: ours(model), "ours-lleaves": lambda: ours_compiled(bench, model),
              "mlserver-best": lambda: mlserver(bench, model, True),
              "mlserver-default": lambda: mlserver(bench, model, False), "kserve": lambda: kserve(bench, model),
              "baseline": lambda: baseline(model)}
    booster = lgb.Booster(model_file=model)
    bodies = {}
    tmp = tempfile.mkdtemp(prefix="serve-bodies-", dir=bench)
    for rows in ROWS:
        x = np.ascontiguousarray(np.random.default_rng(5).normal(size=(rows, booster.num_feature())))
        for proto, build in (("REST", rest_body), ("gRPC", grpc_body)):
            path = f"{tmp}/{proto}-{rows}"
            with open(path, "wb") as f:
                f.write(build(x))
            bodies[(proto, rows)] = (path, x, booster.predict(x, num_threads=1))
    servers = [makers[key]() for key in names or ["ours", "mlserver-best", "mlserver-default", "kserve"]]
    try:
        for server in servers:  # all started first: an idle server takes no CPU, and points interleave
            start(server)
            for rows in ROWS:
                check(server, bodies[("REST", rows)][1], bodies[("REST", rows)][2])
        raw = {rows: [raw_rate(model, rows)] for rows in ROWS}
        for proto in ("REST", "gRPC"):
            for rows in ROWS:
                for conns in CONNS:
                    # every server at this point back to back, so a ratio divides figures seconds apart
                    for server in servers:
                        p = load(proto, server, bodies[(proto, rows)][0], conns, seconds, warmup)
                        server.points[(proto, rows, conns)] = p
                        print(f"serve {server.name:<22} {proto:<4} {rows:>3} rows {conns:>2} conns "
                              f"{p['rps']:>9,.0f} req/s  p50 {p['p50_ms']:7.2f} ms  p99 {p['p99_ms']:7.2f} ms",
                              flush=True)
                if proto == "REST":
                    raw[rows].append(raw_rate(model, rows))
    finally:
        for server in servers:
            stop(server)
        shutil.rmtree(tmp, ignore_errors=True)
    return servers, {rows: sum(v) / len(v) for rows, v in raw.items()}


# -- report ---------------------------------------------------------------------------------------
START, END = "<!-- serve-peers:start -->", "<!-- serve-peers:end -->"


def targets(servers: list[Server], raw: dict[int, float]) -> list[tuple[str, float, float]]:
    """(target, measured ratio, wanted) for issue #19's targets, each the worst point's ratio."""
    us, peers = servers[0], [s for s in servers[1:] if not s.name.startswith("ours")]
    assert us.name == "ours" and peers, "targets need our server first and at least one peer"
    pts = list(us.points)
    best = {k: max(p.points[k]["rps"] for p in peers) for k in pts}
    low_p99 = {k: min(p.points[k]["p99_ms"] for p in peers) for k in pts}
    busy = [k for k in pts if k[2] >= 8 and k[1] == 1]  # the concurrency targets: 1 row per request
    busy_100 = [k for k in pts if k[2] >= 8 and k[1] == 100]
    one = [k for k in pts if k[2] == 1]
    hundred = [k for k in pts if k[1] == 100]
    compiled = [s for s in servers if s.name == "ours, lleaves"]
    extra = [("serve compiled (lleaves): rows/s at 100 rows/request / best peer, worst point",
              min(compiled[0].points[k]["rps"] / best[k] for k in hundred), 4.0)] if compiled else []
    return extra + [
        ("serve: req/s / best peer, worst of all points", min(us.points[k]["rps"] / best[k] for k in pts), 1.0),
        *((f"serve {proto}: req/s / best peer at 1 row/request, worst of 8 and 32 connections",
           min(us.points[k]["rps"] / best[k] for k in busy if k[0] == proto), 2.5) for proto in ("REST", "gRPC")),
        ("serve: lowest peer p99 / our p99 at 1 row/request, worst of 8 and 32 connections",
         min(low_p99[k] / us.points[k]["p99_ms"] for k in busy), 1.0),
        ("serve: lowest peer p99 / our p99 at 100 rows/request, worst of 8 and 32 connections",
         min(low_p99[k] / us.points[k]["p99_ms"] for k in busy_100), 1.0),
        ("serve: lowest peer p50 / our p50 at 1 connection, worst point",
         min(min(p.points[k]["p50_ms"] for p in peers) / us.points[k]["p50_ms"] for k in one), 1.0),
        ("serve: rows/s at 100 rows/request / raw Booster.predict, worst point",
         min(us.points[k]["rps"] * 100 / raw[100] for k in hundred), 0.9),
    ]


def report(servers: list[Server], raw: dict[int, float], seconds: float, load_note: str) -> str:
    """The BENCHMARKS.md section (between START and END) for one run of ``run``."""
    us, others = servers[0], servers[1:]
    peers = [s for s in others if not s.name.startswith("ours")]
    lines = [START, "## Serve beside its peers", "",
             f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. Each server pinned to core 0, the load generator to core 1 (wrk for REST, h2load for "
             f"gRPC), {seconds:g} s per point after 1 s of warm-up, the servers interleaved point by point. "
             f"Raw `Booster.predict` on core 0: {raw[1]:,.0f} rows/s at 1 row/call, {raw[100]:,.0f} at 100. "
             f"{load_note}", "",
             "| target | measured | wanted | met |", "|---|---|---|---|"]
    for name, got, wanted in targets(servers, raw):
        lines.append(f"| {name} | {got:.2f}x | >= {wanted:.2f}x | {'yes' if got >= wanted else '**no**'} |")
    head = " | ".join(f"{p.name} req/s (p50 / p99 ms)" for p in others)
    lines += ["", f"| protocol | rows | conns | ours req/s (p50 / p99 ms) | {head} | ours / best peer | "
              "ours rows/s / raw |", "|---|---|---|---|" + "---|" * len(others) + "---|---|"]
    for k, p in us.points.items():
        best = max(s.points[k]["rps"] for s in peers)
        cells = " | ".join(f"{s.points[k]['rps']:,.0f} ({s.points[k]['p50_ms']:.1f} / {s.points[k]['p99_ms']:.1f})"
                           for s in others)
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {p['rps']:,.0f} ({p['p50_ms']:.1f} / {p['p99_ms']:.1f}) | "
                     f"{cells} | {p['rps'] / best:.2f}x | {p['rps'] * k[1] / raw[k[1]]:.2f}x |")
    lines += ["", "MLServer (best here): " + ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in MLSERVER_BEST.items())
              + "; MLServer (default): only the ports set. KServe: `kserve.ModelServer` defaults with "
              "`benchmarks/kserve_peer.py`. All with `OMP_NUM_THREADS=1`. *ours before #19* (with `--serve-baseline`): "
              "our server on asyncio + h11 without gc.freeze (`benchmarks/ours_baseline.py`).", END]
    return "\n".join(lines) + "\n"


def replace_section(path: str, section: str) -> None:
    """Put ``section`` into the file at ``path`` in place of the previous one (or at its end)."""
    text = open(path).read() if os.path.exists(path) else ""
    if START in text and END in text:
        text = text[:text.index(START)] + section + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)
