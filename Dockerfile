# qkdgate lab image: the gateway daemon on Debian 12 (bookworm).
#
# For labs and demos in network namespaces, e.g.
#   docker run --cap-add NET_ADMIN --network <ns> -v ./etc:/etc/qkdgate:ro qkdgate
# It runs as root inside the container on purpose: Docker gives a non-root
# process no effective capabilities, and XFRM/MACsec netlink needs
# CAP_NET_ADMIN; nothing else is added (--cap-add NET_ADMIN only).
# Production hosts use the systemd unit (systemd/qkdgate.service) instead.
#
# The install steps are the README's "Installation" steps, unchanged.
# CI builds this file with buildah (tools/test-image.sh) and lints it with
# hadolint.

FROM debian:bookworm-slim

LABEL org.opencontainers.image.title="qkdgate" \
      org.opencontainers.image.description="Hybrid ML-KEM + X25519 + QKD encryptor gateway for Linux IPsec and MACsec" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Debian stable only takes security fixes, so the suite pins the versions;
# pinning exact package versions would break the build at every update.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates iproute2 \
 && rm -rf /var/lib/apt/lists/*

COPY . /usr/src/qkdgate

# README "Installation": a venv in /opt/qkdgate, qkdgate from the checkout,
# private config and state directories, the example config; and the
# entrypoint that runs the failsafe when the daemon dies.
RUN python3 -m venv /opt/qkdgate \
 && /opt/qkdgate/bin/pip install --no-cache-dir /usr/src/qkdgate \
 && install -d -m 0700 /etc/qkdgate /var/lib/qkdgate \
 && install -m 0600 /usr/src/qkdgate/systemd/qkdgate.yaml /etc/qkdgate/qkdgate.yaml \
 && install -m 0755 /usr/src/qkdgate/container/entrypoint.sh /usr/local/bin/qkdgate-entrypoint \
 && rm -rf /usr/src/qkdgate

ENV PATH=/opt/qkdgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# The journal of consumed QKD key_IDs must outlive the container.
VOLUME ["/var/lib/qkdgate"]
# Peer protocol (UDP) and the Prometheus endpoint.
EXPOSE 4600/udp 9464/tcp

# Healthy = the daemon answers on its control socket and every tunnel is up
# (`qkdgate status --quiet` exits 0; 3 if a tunnel is down, 1 if no daemon).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["qkdgate", "status", "--quiet"]

STOPSIGNAL SIGTERM
# PID 1 is a small shell supervisor (container/entrypoint.sh): it passes
# signals to `qkdgate run` and, when the daemon dies by a signal (SIGKILL,
# the OOM killer) or a non-zero exit, runs `qkdgate failsafe` as the systemd
# unit's ExecStopPost does. Other commands (status, check-config...) are
# exec'd unchanged. Give `docker stop` a timeout above the daemon's shutdown:
# a SIGKILL of PID 1 ends the container before anything can run.
ENTRYPOINT ["qkdgate-entrypoint"]
CMD ["run", "--config", "/etc/qkdgate/qkdgate.yaml"]
