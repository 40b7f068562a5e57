# bc-proxy container image: build with `docker build -t bc-proxy .` from the repository root.
# Stage 1 resolves the dependencies into /opt/venv and installs bc-proxy as a wheel;
# stage 2 copies only that venv onto a clean slim image running as an unprivileged user.

FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies get their own layer, derived from pyproject.toml alone, so editing the source
# does not reinstall them. Every runtime dependency ships manylinux wheels: no compiler needed.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && pip install --no-cache-dir --requirement requirements.txt

COPY README.md ./
COPY bc_proxy ./bc_proxy
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip install --no-cache-dir --no-deps /wheels/bc_proxy-*.whl


FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="bc-proxy" \
      org.opencontainers.image.description="Bulletin Connect legacy SMS API on top of WebSMS Connexus" \
      org.opencontainers.image.licenses="MIT"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BC_PROXY_CONFIG=/etc/bc-proxy/bc-proxy.yaml

# Fixed numeric ids so Kubernetes can verify runAsNonRoot and volumes can be chowned to match.
RUN groupadd --system --gid 10001 bcproxy \
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
