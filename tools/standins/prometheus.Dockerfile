# Stand-in for prom/prometheus, built from Debian's prometheus package (2.42)
# where no registry is reachable (tools/standins.py). Laid out like the
# upstream image: runs as nobody, data in /prometheus, the configuration in
# /etc/prometheus/prometheus.yml, wget for health checks.
ARG BASE
FROM ${BASE}

# Unpinned: bookworm's point releases replace old versions on the mirror, so a
# pin would break the build; the suite fixes the major versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown nobody:nogroup /prometheus

# nobody, as upstream; by number, so `docker inspect` shows the uid.
USER 65534
WORKDIR /prometheus
EXPOSE 9090
VOLUME ["/prometheus"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
