"""The Dockerfile's second front end: its final stage built without Docker or a registry.

``docker build`` needs a registry for the base image; this machine reaches none. So
scripts/build-images runs the same Dockerfile here: the final stage's ``FROM
debian:<suite>-slim`` becomes ``debootstrap --variant=minbase <suite>`` from a Debian mirror,
each ``RUN`` runs in that root with ``chroot`` (``/proc``, ``/dev`` and the host's resolver
lent for the step), ``COPY`` copies from the build context, and ``ENV``, ``USER``,
``WORKDIR``, ``EXPOSE``, ``ENTRYPOINT`` and ``CMD`` become the image's configuration. A ``RUN
--mount=type=bind,from=build,...`` gets what the caller supplies for that stage's path (the
engine wheel from scripts/build-wheel and the project wheel, in place of the build stage's
``/wheels``). Any other instruction or option is refused, so the two front ends cannot drift.

Like Docker, it caches the root after each step, keyed by everything the step depends on, so
changing the project's wheel reruns only the step that installs it. The image is written with
umoci as an OCI archive (one layer) that ``ctr images import`` takes.

    python -m devtools.image --dockerfile Dockerfile --context . \\
        --bind build:/wheels=DIR --ref NAME:TAG --out IMAGE.oci.tar --cache DIR --mirror URL
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

BASE_RECIPE = 1
"""Bump when the debootstrap of a base changes (its cached root is then rebuilt)."""
KEPT_STEPS = 6
"""Cached step roots kept (the newest); each is a few hundred MB."""


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Config:
    env: dict[str, str] = field(default_factory=dict)
    user: str = ""
    workdir: str = "/"
    exposed: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


def parse(text: str) -> list[list[Instruction]]:
    """The Dockerfile's stages, each a list of instructions (continuations joined, comments
    and blank lines dropped)."""
    stages: list[list[Instruction]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, args = whole.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), start)
        if instruction.keyword == "FROM":
            stages.append([])
        elif not stages:
            raise ValueError(f"line {start}: {keyword} before FROM")
        stages[-1].append(instruction)
    if not stages:
        raise ValueError("no FROM in the Dockerfile")
    return stages


def base_suite(instruction: Instruction) -> str:
    m = re.fullmatch(r"debian:([a-z]+)-slim(?:\s+AS\s+\S+)?", instruction.args, re.IGNORECASE)
    if not m:
        raise ValueError(
            f"line {instruction.line}: FROM {instruction.args}: only debian:<suite>-slim can be "
            "built without a registry"
        )
    return m.group(1)


_MOUNT = re.compile(
    r"--mount=type=bind,from=(?P<stage>[^,\s]+),source=(?P<source>[^,\s]+),target=(?P<target>\S+)"
)


def split_run(instruction: Instruction) -> tuple[list[tuple[str, str, str]], str]:
    """A RUN's bind mounts (stage, source, target) and its shell command."""
    mounts, rest = [], instruction.args
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        m = _MOUNT.fullmatch(option)
        if not m:
            raise ValueError(f"line {instruction.line}: RUN option {option!r} is not supported")
        mounts.append((m["stage"], m["source"], m["target"]))
        rest = rest.lstrip()
    return mounts, rest


def tree_hash(path: Path) -> str:
    """A hash of a file's or a directory tree's names, modes and contents; of a wheel, its
    members' names and contents (a rebuilt wheel differs only in its timestamps)."""
    h = hashlib.sha256()
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in paths:
        h.update(str(p.relative_to(path.parent if path.is_file() else path)).encode())
        h.update(oct(p.stat().st_mode & 0o777).encode())
        if p.suffix == ".whl":
            with zipfile.ZipFile(p) as wheel:
                for name in sorted(wheel.namelist()):
                    h.update(name.encode())
                    h.update(wheel.read(name))
        else:
            h.update(p.read_bytes())
    return h.hexdigest()


def debian_mirror() -> str:
    """The Debian archive apt uses on this machine (WEIGHBRIDGE_DEBIAN_MIRROR overrides)."""
    if os.environ.get("WEIGHBRIDGE_DEBIAN_MIRROR"):
        return os.environ["WEIGHBRIDGE_DEBIAN_MIRROR"]
    texts = [p.read_text() for p in Path("/etc/apt/sources.list.d").glob("*.sources")]
    for text in texts:
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.MULTILINE):
            if "security" not in m.group(1):
                return m.group(1)
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1]
    raise SystemExit("image: no Debian mirror in apt's sources; set WEIGHBRIDGE_DEBIAN_MIRROR")


def log(message: str) -> None:
    print(f"image: {message}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], **kw: object) -> None:
    """Runs a command, its output to stderr: stdout is the caller's (it names the image)."""
    subprocess.run(argv, check=True, stdout=sys.stderr, **kw)  # type: ignore[call-overload]


def save(root: Path, archive: Path) -> None:
    tmp = archive.with_suffix(f".tmp{os.getpid()}")
    run(["tar", "--numeric-owner", "--xattrs", "-C", root, "-cf", tmp, "."])
    tmp.rename(archive)


def restore(archive: Path, root: Path) -> None:
    root.mkdir(parents=True)
    run(["tar", "--numeric-owner", "--xattrs", "-C", root, "-xf", archive])


def base_root(suite: str, cache: Path, mirror: str) -> Path:
    """The cached root of Debian ``suite``, minbase (what debian:<suite>-slim holds)."""
    archive = cache / f"base-{suite}-minbase-{BASE_RECIPE}.tar"
    if archive.exists():
        return archive
    log(f"debootstrap {suite} (minbase) from {mirror}: a few minutes, once")
    with tempfile.TemporaryDirectory(prefix="wb-base-") as work:
        root = Path(work) / "root"
        out = Path(work) / "debootstrap.log"
        with out.open("w") as f:
            result = subprocess.run(
                ["debootstrap", "--variant=minbase", suite, str(root), mirror],
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        if result.returncode:
            sys.stderr.write("".join(out.read_text().splitlines(True)[-20:]))
            raise SystemExit(f"image: debootstrap {suite} failed")
        for sub in ("dev", "proc", "sys", "run", "tmp"):
            for child in (root / sub).glob("*"):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True)
        save(root, archive)
    return archive


HOST_CA: Final = Path("/etc/ssl/certs/ca-certificates.crt")
"""The host's CA bundle, lent to each step (with SSL_CERT_FILE and PIP_CERT naming it) so that
a step reaches PyPI through whatever TLS-inspecting egress proxy the host trusts; the image
keeps its own CA store."""
LENT_CA: Final = "/run/weighbridge-build-ca.crt"


@contextlib.contextmanager
def lent(root: Path, binds: Mapping[str, Path]) -> Iterator[None]:
    """/proc, /dev, the host's resolver and CA bundle and the RUN's bind mounts, for one
    step."""
    mounted: list[Path] = []
    resolv = root / "etc/resolv.conf"
    saved = resolv.read_bytes() if resolv.is_file() and not resolv.is_symlink() else None
    try:
        for source, target, options in [
            ("/proc", root / "proc", ["-t", "proc"]),
            ("/dev", root / "dev", ["--rbind"]),
            *(
                (str(src), root / tgt.lstrip("/"), ["--bind", "-o", "ro"])
                for tgt, src in binds.items()
            ),
        ]:
            target.mkdir(parents=True, exist_ok=True)
            run(["mount", *options, source, str(target)])
            mounted.append(target)
        if HOST_CA.is_file():
            ca = root / LENT_CA.lstrip("/")
            ca.parent.mkdir(parents=True, exist_ok=True)
            ca.touch()
            run(["mount", "--bind", "-o", "ro", str(HOST_CA), str(ca)])
            mounted.append(ca)
        if resolv.is_symlink():
            resolv.unlink()
        shutil.copyfile("/etc/resolv.conf", resolv)
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "--lazy", "--recursive", str(target)], check=False)
        (root / LENT_CA.lstrip("/")).unlink(missing_ok=True)
        if saved is None:
            resolv.write_text("")
        else:
            resolv.write_bytes(saved)


def build(
    dockerfile: Path,
    context: Path,
    binds: Mapping[tuple[str, str], Path],
    ref: str,
    out: Path,
    cache: Path,
    mirror: str,
) -> None:
    stages = parse(dockerfile.read_text())
    final = stages[-1]
    suite = base_suite(final[0])
    cache.mkdir(parents=True, exist_ok=True)
    base = base_root(suite, cache, mirror)

    # Each step's key: the previous key and what this step reads.
    key = hashlib.sha256(f"{base.name}".encode())
    steps: list[tuple[Instruction, str]] = []
    for ins in final[1:]:
        key.update(f"{ins.keyword} {ins.args}".encode())
        if ins.keyword == "COPY":
            for src in shlex.split(ins.args)[:-1]:
                key.update(tree_hash(context / src).encode())
        elif ins.keyword == "RUN":
            for stage, source, _ in split_run(ins)[0]:
                if (stage, source) not in binds:
                    raise ValueError(f"line {ins.line}: nothing given for {stage}:{source}")
                key.update(tree_hash(binds[stage, source]).encode())
        steps.append((ins, key.hexdigest()[:16]))

    stamp = out.with_name(out.name + ".key")
    if out.exists() and stamp.exists() and stamp.read_text() == steps[-1][1]:
        log(f"{ref}: up to date ({out})")
        return
    done = 0
    for i, (ins, k) in enumerate(steps):
        if ins.keyword == "RUN" and (cache / f"step-{k}.tar").exists():
            done = i + 1
    config = Config(env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"})
    with tempfile.TemporaryDirectory(prefix="wb-image-") as work:
        root = Path(work) / "root"
        start = cache / f"step-{steps[done - 1][1]}.tar" if done else base
        restore(start, root)
        for i, (ins, k) in enumerate(steps):
            apply_step(ins, root, context, binds, config, execute=i >= done)
            if ins.keyword == "RUN" and i >= done:
                save(root, cache / f"step-{k}.tar")
        prune(cache)
        write_oci(root, ref, config, out, Path(work))
    stamp.write_text(steps[-1][1])


def apply_step(
    ins: Instruction,
    root: Path,
    context: Path,
    binds: Mapping[tuple[str, str], Path],
    config: Config,
    *,
    execute: bool,
) -> None:
    """Apply one instruction: to the root when ``execute`` (else a cached root has it), and to
    the configuration always."""
    kw, args = ins.keyword, ins.args
    if kw == "RUN":
        if execute:
            mounts, command = split_run(ins)
            log(f"RUN (line {ins.line})")
            env = {**config.env, "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive"}
            if HOST_CA.is_file():
                env |= {"SSL_CERT_FILE": LENT_CA, "PIP_CERT": LENT_CA}
            with lent(root, {target: binds[stage, source] for stage, source, target in mounts}):
                run(
                    [
                        "chroot",
                        str(root),
                        "/bin/sh",
                        "-c",
                        f"cd {shlex.quote(config.workdir)} && {command}",
                    ],
                    env=env,
                )
    elif kw == "COPY":
        *sources, dest = shlex.split(args)
        if execute:
            target = root / dest.lstrip("/")
            for src in sources:
                path = context / src
                if path.is_dir():
                    shutil.copytree(path, target, dirs_exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
    elif kw == "ENV":
        for item in shlex.split(args):
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"line {ins.line}: ENV needs NAME=VALUE")
            config.env[name] = value
    elif kw == "USER":
        config.user = args
    elif kw == "WORKDIR":
        config.workdir = args
        if execute:
            (root / args.lstrip("/")).mkdir(parents=True, exist_ok=True)
    elif kw == "EXPOSE":
        config.exposed = [p if "/" in p else f"{p}/tcp" for p in args.split()]
    elif kw == "ENTRYPOINT":
        config.entrypoint = json.loads(args)
    elif kw == "CMD":
        config.cmd = json.loads(args)
    else:
        raise ValueError(f"line {ins.line}: {kw} is not supported without Docker")


def prune(cache: Path) -> None:
    steps = sorted(cache.glob("step-*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in steps[KEPT_STEPS:]:
        old.unlink()


def write_oci(root: Path, ref: str, config: Config, out: Path, work: Path) -> None:
    for sub in ("proc", "dev", "tmp", "run"):
        target = root / sub
        if os.path.ismount(target):
            raise SystemExit(f"image: {target} is still mounted; not packing it")
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    tag = ref.rsplit(":", 1)[1]
    layout = work / "oci"
    image = f"{layout}:{tag}"
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", image])
    run(["umoci", "insert", "--image", image, str(root), "/"])
    flags = ["--author", "weighbridge", "--config.workingdir", config.workdir]
    if config.user:
        flags += ["--config.user", config.user]
    for name, value in config.env.items():
        flags += ["--config.env", f"{name}={value}"]
    for port in config.exposed:
        flags += ["--config.exposedports", port]
    flags += ["--clear=config.entrypoint"] if not config.entrypoint else []
    for arg in config.entrypoint:
        flags += ["--config.entrypoint", arg]
    for arg in config.cmd:
        flags += ["--config.cmd", arg]
    run(["umoci", "config", "--image", image, *flags])
    run(["umoci", "gc", "--layout", str(layout)])
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    run(["tar", "-C", str(layout), "-cf", str(tmp), "."])
    tmp.rename(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dockerfile", type=Path, default=Path("Dockerfile"))
    p.add_argument("--context", type=Path, default=Path("."))
    p.add_argument(
        "--bind",
        action="append",
        default=[],
        metavar="STAGE:PATH=DIR",
        help="what a RUN --mount=type=bind,from=STAGE,source=PATH gets",
    )
    p.add_argument("--ref", required=True, help="the image's NAME:TAG")
    p.add_argument("--out", type=Path, required=True, help="the OCI archive to write")
    p.add_argument("--cache", type=Path, required=True, help="where base and step roots are kept")
    p.add_argument("--mirror", default=None, help="Debian mirror (default: apt's)")
    args = p.parse_args(argv)
    binds: dict[tuple[str, str], Path] = {}
    for item in args.bind:
        spec, _, directory = item.partition("=")
        stage, _, path = spec.partition(":")
        binds[stage, path] = Path(directory).resolve()
    build(
        args.dockerfile,
        args.context.resolve(),
        binds,
        args.ref,
        args.out.resolve(),
        args.cache.resolve(),
        args.mirror or debian_mirror(),
    )


if __name__ == "__main__":
    main()
