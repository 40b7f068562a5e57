# bc-proxy container image: build with `docker build -t bc-proxy .` from the repository root.
# Stage 1 installs the hash-locked dependencies (requirements.lock) into /opt/venv, a venv
# without pip, and bc-proxy as a wheel; stage 2 copies only that venv onto a clean slim image
# running as an unprivileged user, with pip, setuptools and wheel removed.
#
# Base image pinned by digest: the multi-arch index of python:3.11.10-slim-bookworm (Debian 12),
# which is what the python:3.11-slim tag pointed to when pinned; taken from a Renovate-maintained
# digest list (nalabelle/build, images/digests.Dockerfile). Docker uses the digest, not the tag.
# To move on: docker buildx imagetools inspect python:3.11-slim, copy the index digest here.
FROM python:3.11-slim@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16 AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Dependencies get their own layer, from the lockfiles alone, so editing the source does not
# reinstall them. Every package is pinned with its hashes (--require-hashes) and installed
# from wheels only: no compiler, no unpinned build-time download. The system pip installs
# into the venv (--python), so the venv never holds pip or setuptools.
COPY requirements.lock requirements-build.lock ./
RUN python -m pip install --require-hashes --only-binary=:all: --requirement requirements-build.lock \
 && python -m venv --without-pip /opt/venv \
 && python -m pip --python /opt/venv/bin/python install --require-hashes --only-binary=:all: \
    --no-deps --requirement requirements.lock

COPY pyproject.toml README.md ./
COPY bc_proxy ./bc_proxy
RUN python -m pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && python -m pip --python /opt/venv/bin/python install --no-deps /wheels/bc_proxy-*.whl


FROM python:3.11-slim@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16 AS runtime

LABEL org.opencontainers.image.title="bc-proxy" \
      org.opencontainers.image.description="Bulletin Connect legacy SMS API on top of WebSMS Connexus" \
      org.opencontainers.image.licenses="MIT"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BC_PROXY_CONFIG=/etc/bc-proxy/bc-proxy.yaml

# Fixed numeric ids so Kubernetes can verify runAsNonRoot and volumes can be chowned to match.
# No package installer in the running image: pip, setuptools and wheel leave the base too.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && groupadd --system --gid 10001 bcproxy \
 && useradd --system --uid 10001 --gid bcproxy --home-dir /var/lib/bc-proxy --no-create-home \
    --shell /usr/sbin/nologin bcproxy \
 && mkdir -p /etc/bc-proxy /var/lib/bc-proxy \
 && chown bcproxy:bcproxy /var/lib/bc-proxy

COPY --from=builder /opt/venv /opt/venv

# The configuration is mounted at /etc/bc-proxy (compose bind mount, Kubernetes ConfigMap);
# the embedded SQLite store lives in the volume, and relative store paths land there too.
WORKDIR /var/lib/bc-proxy
VOLUME /var/lib/bc-proxy

USER 10001:10001

# 8080: legacy API, Connexus webhooks and probes; 9102: /metrics (server.metrics_port in the
# shipped configs), for Prometheus only: do not publish it.
EXPOSE 8080 9102

# Liveness only: /readyz would mark the container unhealthy while the upstream is down.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["bc-proxy"]
CMD ["serve", "--config", "/etc/bc-proxy/bc-proxy.yaml"]
