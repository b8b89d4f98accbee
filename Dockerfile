# The Forestall image: one image, one entry point (`forestall`), a subcommand per component:
#   forestall controller ...   forestall balancer ...   forestall picker ...
# Build: docker build -t ghcr.io/forestall-dev/forestall:0.1.0 .
# Runs as a non-root user with a read-only root filesystem (the manifests mount /tmp for caches).

FROM python:3.11-slim AS build
WORKDIR /src
# Only what the wheel needs: the packages (the lab, emulation/, too: `forestall simulate` and `demo` ship) and the generated CRD it bundles (pyproject force-include).
COPY pyproject.toml README.md ./
COPY controller/ controller/
COPY balancer/ balancer/
COPY forecast/ forecast/
COPY contract/ contract/
COPY emulation/ emulation/
COPY forestall/ forestall/
COPY manifests/crd/ manifests/crd/
RUN python -m venv /opt/forestall \
    && /opt/forestall/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/forestall/bin/pip install --no-cache-dir ".[fast,gateway]"

FROM python:3.11-slim
# A fixed numeric UID/GID so `runAsNonRoot` can be verified by the kubelet without a passwd lookup;
# 65532 is the conventional "nonroot" id of distroless images and matches the manifests' runAsUser.
RUN groupadd --gid 65532 forestall \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin forestall
COPY --from=build /opt/forestall /opt/forestall
ENV PATH=/opt/forestall/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
USER 65532:65532
# 8080 balancer proxy, 8081 balancer admin/signals, 8082 controller metrics and health.
EXPOSE 8080 8081 8082
ENTRYPOINT ["forestall"]
CMD ["--help"]
