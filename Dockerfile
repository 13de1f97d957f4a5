# pinproxy as an ingress sidecar or a shared edge tier (deploy/ has Kubernetes examples).
# Build: docker build -t pinproxy .
# Run:   docker run -p 8080:8080 -p 9901:9901 -e PINPROXY_ADMIN_TOKEN="$(openssl rand -hex 32)" \
#          -e PINPROXY_STORE__URL=redis://redis:6379/0 -e PINPROXY_BACKENDS='[{"id": ...}]' pinproxy
# Own settings: docker run -v "$PWD/config:/etc/pinproxy:ro" ... pinproxy \
#          serve --config /etc/pinproxy/example.toml
# The baked settings live outside /etc/pinproxy, so mounting a folder there hides nothing.
# tests/integration/deploy/test_image.py repeats these steps without Docker; keep it in step.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE constraints.txt ./
COPY proxy ./proxy
COPY config ./config
# The constraints pin every dependency (and the build backend) to what CI tested.
RUN PIP_CONSTRAINT=/src/constraints.txt pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
COPY config/container.toml /usr/share/pinproxy/config.toml
# Numeric, so a pod's runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# 8080: the data plane (and its health paths); 9901: the admin API and /metrics.
EXPOSE 8080 9901
# SIGTERM starts the graceful drain (listen.drain_grace_s, then listen.shutdown_timeout_s);
# give the orchestrator's termination grace period a few seconds more than both.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pinproxy"]
CMD ["serve", "--config", "/usr/share/pinproxy/config.toml"]
