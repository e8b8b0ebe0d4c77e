# The image the Helm chart runs: weighbridge-controller, weighbridge-proxy and wbctl.
#   docker build -t weighbridge/weighbridge:0.1.0 .
FROM python:3.11-slim AS build
# The proxy's data path (native/) is Rust, built into a wheel by maturin.
RUN apt-get update && apt-get install -y --no-install-recommends cargo && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY weighbridge weighbridge
COPY controlplane controlplane
COPY dataplane dataplane
COPY native native
RUN pip install --no-cache-dir --prefix=/install . ./native

FROM python:3.11-slim
COPY --from=build /install /usr/local
# Non-root, matching the chart's securityContext (runAsUser 65532); the root filesystem can be
# read-only: nothing is written at run time.
USER 65532:65532
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 8080 9401 9402 9501 9502
ENTRYPOINT []
CMD ["weighbridge-proxy", "--help"]
