# The image the Helm chart runs: weighbridge-controller, weighbridge-proxy and wbctl.
#   docker build -t weighbridge/weighbridge:0.1.0 .
#
# One recipe, two front ends. `docker build` runs this file. scripts/build-images runs the same
# file without Docker or a registry (devtools/image.py): it debootstraps the final stage's base
# (debian:<suite>-slim → Debian <suite>, variant minbase), runs each of its RUN lines in that
# root, and applies its ENV, USER, WORKDIR, EXPOSE, ENTRYPOINT and CMD. Only the build stage
# differs: there the engine wheel comes from scripts/build-wheel (the same `maturin build` as
# below) and the project wheel from `pip wheel`. devtools/image.py refuses any instruction it
# does not know, so the two cannot drift apart.
#
# Base: Debian 13 (trixie) and its python3 (3.13; the project supports CPython 3.11-3.13, the
# engine wheel is abi3).

FROM debian:trixie-slim AS build
# The proxy's engine (native/) is Rust, built into a wheel by maturin. Rust comes from Debian 13's
# own packages (cargo/rustc 1.85.x), which meet native/Cargo.toml's rust-version 1.85, the true
# minimum of Cargo.lock's dependencies (pyo3 0.30, tokio 1.54); cargo refuses an older rustc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cargo python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY native native
# maturin at the version native/pyproject.toml pins, crates exactly as in Cargo.lock, one
# cp311-abi3 wheel: what scripts/build-wheel builds.
RUN python3 -m venv /tools \
 && /tools/bin/pip install --no-cache-dir "$(sed -n 's/.*"\(maturin==[^"]*\)".*/\1/p' native/pyproject.toml)" \
 && /tools/bin/maturin build --release --locked --manifest-path native/Cargo.toml \
      --interpreter python3 --out /wheels
COPY pyproject.toml README.md ./
COPY weighbridge weighbridge
COPY controlplane controlplane
COPY dataplane dataplane
COPY wbtools wbtools
RUN /tools/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM debian:trixie-slim
COPY deploy/image/install /usr/local/lib/weighbridge/install
# Debian's python3, then a virtualenv in /opt/weighbridge with the two wheels and their pinned
# dependencies from PyPI: no Rust toolchain, no sources, no wheel files left in a layer.
RUN /usr/local/lib/weighbridge/install base
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    /usr/local/lib/weighbridge/install project /wheels
# Non-root, matching the chart's securityContext (runAsUser 65532); the root filesystem can be
# read-only: nothing is written at run time.
USER 65532:65532
ENV PATH=/opt/weighbridge/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 8080 9402 9403 9502 9503
ENTRYPOINT []
CMD ["weighbridge-proxy", "--help"]
