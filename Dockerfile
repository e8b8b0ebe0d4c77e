# The image the Helm chart runs: weighbridge-controller, weighbridge-proxy and wbctl.
#   docker build -t weighbridge/weighbridge:0.1.0 .
#
# One place for the base: the official Python image on Debian 13 (trixie), pinned to an exact
# CPython patch release (3.13.16, the newest 3.13 with a published slim-trixie tag when this was
# written). Both stages use it. The project supports CPython 3.11-3.13; the engine wheel is abi3.
ARG PYTHON_VERSION=3.13.16
ARG DEBIAN_RELEASE=trixie

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build
# The proxy's engine (native/) is Rust, built into a wheel by maturin. Rust comes from Debian 13's
# own packages (cargo/rustc 1.85.x), which meet native/Cargo.toml's rust-version 1.85, the true
# minimum of Cargo.lock's dependencies (pyo3 0.30, tokio 1.54); cargo refuses an older rustc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cargo \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY native native
# The same build scripts/build-wheel runs: maturin at the version native/pyproject.toml pins,
# crates exactly as in Cargo.lock, one cp311-abi3 wheel.
RUN pip install --no-cache-dir "$(sed -n 's/.*"\(maturin==[^"]*\)".*/\1/p' native/pyproject.toml)" \
 && maturin build --release --locked --manifest-path native/Cargo.toml --interpreter python3 \
      --out /wheels
COPY pyproject.toml README.md ./
COPY weighbridge weighbridge
COPY controlplane controlplane
COPY dataplane dataplane
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}
# Only the project and the engine wheel (plus their pinned dependencies from PyPI): no Rust
# toolchain, no sources, no wheel files left in a layer.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/*.whl
# Non-root, matching the chart's securityContext (runAsUser 65532); the root filesystem can be
# read-only: nothing is written at run time.
USER 65532:65532
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 8080 9402 9403 9502 9503
ENTRYPOINT []
CMD ["weighbridge-proxy", "--help"]
