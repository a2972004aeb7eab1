# datasync service image: slim Python, non-root, compiled aiokafka/fastavro/avrowalk/snapblock/keyvalue checked at build time.
FROM python:3.11-slim AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY service ./service
RUN pip install --no-cache-dir --prefix=/install . \
 && PYTHONPATH=$(echo /install/lib/python3.11/site-packages) python -c "\
import aiokafka.record._crecords.default_records as a, fastavro._read as f, datasync._avrowalk as w, datasync._snapblock as s, datasync._keyvalue as k; \
assert all(m.__file__.endswith('.so') for m in (a, f, w, s, k)), 'C extensions missing'; \
print('C extensions:', a.__file__, f.__file__, w.__file__, s.__file__, k.__file__)"

FROM python:3.11-slim
COPY --from=build /install /usr/local
# /var/lib/datasync: the state directory (DATASYNC_STATE_DIR in docker-compose.yml); a named
# volume mounted there starts out owned by datasync.
RUN useradd --create-home --uid 10001 datasync \
 && install -d -o datasync -g datasync /var/lib/datasync
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
# The port the service listens on, so a changed DATASYNC_HTTP__PORT is followed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DATASYNC_HTTP__PORT', '8080'), timeout=4)" || exit 1
ENTRYPOINT ["datasync"]
CMD ["run"]
