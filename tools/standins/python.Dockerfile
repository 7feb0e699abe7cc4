# Stand-in for python:3.11-slim-bookworm, built from Debian's packages where
# no registry is reachable (tools/standins.py). Debian bookworm's python3 is
# 3.11, as in the pinned upstream image; like it, `python` and `pip` are on
# PATH and pip installs system-wide. pip cannot reach PyPI from a container
# here, so requirements come from a wheelhouse made on the host.
ARG BASE
FROM ${BASE}

# Unpinned: bookworm's point releases replace old versions on the mirror, so a
# pin would break the build; the suite fixes the major versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED \
    && ln -s /usr/bin/python3 /usr/local/bin/python \
    && ln -s /usr/bin/pip3 /usr/local/bin/pip

COPY wheels /wheels
ENV PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/wheels
