"""The engine's HTTP/2 constants measured side by side, to choose them by measurement.

Each variant is the engine of one commit (HEAD by default) with constants of
native/src/proxy.rs set to given values (every variant sets them explicitly, so that the
commit's own value does not matter); it is built once into ~/.cache/weighbridge/variants/ (a
`git archive` of the commit, the edited constant, a wheel installed with --target), outside
the checkout, and runs as `weighbridge-proxy --threads 1` from that tree with this venv's
interpreter, so that variants differ only in the constant. Same grpc-go echo backends and load
generator as bench/compare.py; rounds interleaved (the order of variants reversed every other
round), medians reported, with each round's calls/s to show the noise.

    .venv/bin/python -m bench.tuning window  [--rounds 5] [--seconds 10] [--rev REV] [--json P]
    .venv/bin/python -m bench.tuning streams [--rounds 5] [--seconds 10] [--rev REV] [--json P]

window   CONNECTION_WINDOW (the proxy's receive window per HTTP/2 connection, to clients and
         to backends), 8 MiB against 16 MiB (the removed Python engine's): 1 MiB unary calls,
         16 in flight, on one client connection and on 8: throughput in MiB/s each way, proxy
         CPU, proxy RSS (after each run, and the peak).
streams  MAX_CONCURRENT_STREAMS advertised to clients, 4096 against 1000 (the removed Python
         engine's): 64-byte calls, 2000 in flight on ONE client connection (grpc-go queues
         what exceeds the limit in the client): throughput, p50/p99, CPU per call, RSS.

Everything runs on loopback; runs are bounded in time and every process is stopped on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.compare import (
    ROOT,
    Cores,
    ProxySpec,
    Target,
    build_go,
    cache_dir,
    environment,
    git,
    loadgen,
)
from bench.procstat import peak_rss_mb, rss_mb


@dataclass(frozen=True)
class Load:
    label: str
    connections: int
    concurrency: int
    size: int


@dataclass(frozen=True)
class Experiment:
    variants: dict[str, dict[str, str]]  # label → {constant: Rust expression}
    loads: tuple[Load, ...]


MIB = 1 << 20
EXPERIMENTS = {
    "window": Experiment(
        {
            "window-8MiB": {"CONNECTION_WINDOW": "8 << 20"},
            "window-16MiB": {"CONNECTION_WINDOW": "16 << 20"},
        },
        (
            Load("1 MiB calls, 16 in flight, 1 connection", 1, 16, MIB),
            Load("1 MiB calls, 16 in flight, 8 connections", 8, 16, MIB),
        ),
    ),
    "streams": Experiment(
        {
            "streams-4096": {"MAX_CONCURRENT_STREAMS": "4096"},
            "streams-1000": {"MAX_CONCURRENT_STREAMS": "1000"},
        },
        (Load("64 B calls, 2000 in flight, 1 connection", 1, 2000, 64),),
    ),
}


def build_variant(commit: str, consts: dict[str, str]) -> ProxySpec:
    """The engine of ``commit`` with ``consts`` replaced in native/src/proxy.rs, cached."""
    name = "-".join(f"{k}={v}" for k, v in sorted(consts.items())) or "stock"
    home = cache_dir() / "variants" / f"{commit[:12]}-{re.sub(r'[^A-Za-z0-9=_-]+', '_', name)}"
    src, lib, stamp = home / "src", home / "lib", home / "ready"
    if not (stamp.exists() and stamp.read_text().strip() == commit):
        print(f"bench: building variant {home.name} (once)", file=sys.stderr)
        shutil.rmtree(home, ignore_errors=True)
        src.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", commit], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        rs = src / "native" / "src" / "proxy.rs"
        text = rs.read_text()
        for k, v in consts.items():
            text, n = re.subn(rf"(const {k}: u32 = )[^;]+;", rf"\g<1>{v};", text)
            if n != 1:
                raise SystemExit(f"{k} is not a u32 constant of {rs}")
        rs.write_text(text)
        wheels = home / "wheel"
        env = {"CARGO_TARGET_DIR": str(cache_dir() / "variants" / "target")}
        pip = [sys.executable, "-m", "pip", "-q"]
        subprocess.run(
            [*pip, "wheel", "--no-deps", "-w", str(wheels), str(src / "native")],
            check=True,
            env={**os.environ, **env},
        )
        wheel = next(wheels.glob("*.whl"))
        subprocess.run([*pip, "install", "--no-deps", "--target", str(lib), str(wheel)], check=True)
        stamp.write_text(commit + "\n")
    spec = ProxySpec(name, ["--threads", "1"], cwd=src, env={"PYTHONPATH": f"{lib}:{src}"})
    # The variant's tree and engine, not the checkout's.
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import dataplane, weighbridge_native as w; print(dataplane.__file__, w.__file__)",
        ],
        cwd=src,
        env={**os.environ, **spec.env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if not (where[0].startswith(str(src)) and where[1].startswith(str(lib))):
        raise SystemExit(f"variant {name} imports {where}, not its own tree")
    return spec


def run(what: str, rounds: int, seconds: float, rev: str) -> dict[str, object]:
    exp = EXPERIMENTS[what]
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    specs = []
    for label, consts in exp.variants.items():
        spec = build_variant(commit, consts)
        spec.name = label
        specs.append(spec)
    bins = build_go()
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    peaks: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory(prefix="wb-tuning-") as tmp,
        environment(Path(tmp), bins, specs, others=set()) as env,
    ):
        backend_pids = [p.pid for p in env.backend_procs]
        for t in env.targets:
            loadgen(bins, t, env.backends, 1.0, concurrency=8)  # warm up
        for r in range(rounds):
            for load in exp.loads:
                order: list[Target] = env.targets if r % 2 == 0 else env.targets[::-1]
                for t in order:
                    cores = Cores.start(t, backend_pids)
                    res = loadgen(
                        bins,
                        t,
                        env.backends,
                        seconds,
                        connections=load.connections,
                        concurrency=load.concurrency,
                        size=load.size,
                    )
                    used = cores.stop(t, backend_pids, res["cpu_s"])
                    calls = max(res["requests"], 1)
                    runs.setdefault((load.label, t.name), []).append(
                        {
                            "rps": res["rps"],
                            "mib_per_s": res["rps"] * load.size / MIB,
                            "p50_us": res["p50_us"],
                            "p99_us": res["p99_us"],
                            "errors": res["errors"],
                            "cpu_us_per_call": used["proxy_cpu_s"] / calls * 1e6,
                            "cores_proxy": used["cores_proxy"],
                            "cores_idle": used["cores_idle"],
                            "rss_mb": rss_mb(t.pids()),
                        }
                    )
        for t in env.targets:
            peaks[t.name] = peak_rss_mb(t.pids())
    table: dict[str, dict[str, dict[str, object]]] = {}
    for (label, name), rs in runs.items():
        table.setdefault(label, {})[name] = {
            **{k: round(statistics.median(x[k] for x in rs), 2) for k in rs[0]},
            "rps_by_round": [round(x["rps"], 1) for x in rs],
        }
    return {
        "experiment": what,
        "commit": commit,
        "rounds": rounds,
        "seconds_per_run": seconds,
        "variants": exp.variants,
        "loads": table,
        "peak_rss_mb": {k: round(v, 1) for k, v in peaks.items()},
    }


def markdown(result: dict[str, object]) -> str:
    lines = []
    loads = result["loads"]
    assert isinstance(loads, dict)
    for label, by_variant in loads.items():
        lines += [
            f"{label} (medians of {result['rounds']} interleaved rounds of "
            f"{result['seconds_per_run']} s):",
            "",
            "| variant | calls/s | calls/s each round | MiB/s each way | p50 µs | p99 µs | errors "
            "| proxy CPU µs/call | proxy cores | idle cores | proxy RSS MB |",
            "|" + "---|" * 11,
        ]
        for name, r in by_variant.items():
            lines.append(
                f"| {name} | {r['rps']:.0f} | {' '.join(f'{x:.0f}' for x in r['rps_by_round'])} "
                f"| {r['mib_per_s']:.1f} | {r['p50_us']:.0f} "
                f"| {r['p99_us']:.0f} | {r['errors']:.0f} | {r['cpu_us_per_call']:.1f} "
                f"| {r['cores_proxy']:.2f} | {r['cores_idle']:.2f} | {r['rss_mb']:.1f} |"
            )
        lines.append("")
    lines.append(f"Peak RSS over the whole run (VmHWM, MB): {result['peak_rss_mb']}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.tuning",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("what", choices=sorted(EXPERIMENTS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rev", default="HEAD", help="the commit whose engine is varied (HEAD)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    result = run(args.what, args.rounds, args.seconds, args.rev)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
