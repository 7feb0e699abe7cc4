# Stand-in for prom/alertmanager, built from Debian's prometheus-alertmanager
# package (0.25) where no registry is reachable (tools/standins.py). Laid out
# like the upstream image: runs as nobody, data in /alertmanager, the
# configuration in /etc/alertmanager/alertmanager.yml, wget for health checks.
ARG BASE
FROM ${BASE}

# Unpinned: bookworm's point releases replace old versions on the mirror, so a
# pin would break the build; the suite fixes the major versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       prometheus-alertmanager wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /alertmanager /etc/alertmanager \
    && cp /etc/prometheus/alertmanager.yml /etc/alertmanager/alertmanager.yml \
    && chown nobody:nogroup /alertmanager

# nobody, as upstream; by number, so `docker inspect` shows the uid.
USER 65534
WORKDIR /alertmanager
EXPOSE 9093
VOLUME ["/alertmanager"]
ENTRYPOINT ["/usr/bin/prometheus-alertmanager"]
CMD ["--config.file=/etc/alertmanager/alertmanager.yml", "--storage.path=/alertmanager"]
