# pinproxy as an ingress sidecar. Build: docker build -t pinproxy .
# Run:   docker run -v $PWD/config:/etc/pinproxy -p 8080:8080 pinproxy
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 pinproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/example.toml /etc/pinproxy/config.toml
USER pinproxy
EXPOSE 8080
# SIGTERM starts the graceful drain (listen.shutdown_timeout_s); give the
# orchestrator's termination grace period a few seconds more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pinproxy", "serve", "--config", "/etc/pinproxy/config.toml"]
