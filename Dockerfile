# datasync service image: slim Python, non-root, compiled aiokafka/fastavro/avrowalk checked at build time.
FROM python:3.11-slim AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY service ./service
RUN pip install --no-cache-dir --prefix=/install . \
 && PYTHONPATH=$(echo /install/lib/python3.11/site-packages) python -c "\
import aiokafka.record._crecords.default_records as a, fastavro._read as f, datasync._avrowalk as w; \
assert all(m.__file__.endswith('.so') for m in (a, f, w)), 'C extensions missing'; \
print('C extensions:', a.__file__, f.__file__, w.__file__)"

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --create-home --uid 10001 datasync \
 && mkdir -p /var/lib/datasync && chown datasync /var/lib/datasync
WORKDIR /app
COPY --chown=datasync topics ./topics
COPY --chown=datasync schemas ./schemas
COPY --chown=datasync examples ./examples
USER datasync
ENV DATASYNC_HTTP__HOST=0.0.0.0 \
    DATASYNC_HTTP__PORT=8080 \
    DATASYNC_STATE_DIR=/var/lib/datasync \
    PYTHONUNBUFFERED=1
# Table snapshots: a restart reads only what changed since (mount a volume to keep them).
VOLUME /var/lib/datasync
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)" || exit 1
ENTRYPOINT ["datasync"]
CMD ["run"]
