#!/bin/sh
# Builds the images' base locally, with no registry: a minimal Debian root made by mmdebstrap from
# the Debian mirror, `docker import`-ed as $BASE_IMAGE. It carries what every xmag image needs from
# the distribution (python3 with venv, CA certificates); the Dockerfiles add the rest
# (FROM ${BASE_IMAGE}: their build ARG). `make base-image` runs this; needs root (or
# mmdebstrap's unshare mode), mmdebstrap and a Docker engine.
#
#   SUITE          Debian suite (bookworm: Python 3.11, the version the project requires).
#   MIRROR         Debian mirror; the security suite comes from SECURITY_MIRROR.
#   BASE_IMAGE     tag to import as (xmag-base:<suite>).
#   EXTRA_CA_CERTS space-separated PEM files (*.crt) trusted in addition to Debian's bundle: a
#                  TLS-inspecting proxy's CA, so pip and apt inside builds reach their registries.
set -eu

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BASE_IMAGE=${BASE_IMAGE:-xmag-base:$SUITE}
EXTRA_CA_CERTS=${EXTRA_CA_CERTS:-}
PACKAGES=ca-certificates,python3,python3-venv,tzdata

for tool in mmdebstrap docker; do
    command -v "$tool" >/dev/null || {
        echo "base-image: $tool not found; install it (apt-get install mmdebstrap; Docker Engine)" >&2
        exit 1
    }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
hooks=""
if [ -n "$EXTRA_CA_CERTS" ]; then
    mkdir -p "$work/ca"
    for cert in $EXTRA_CA_CERTS; do
        cp "$cert" "$work/ca/$(basename "$cert" .crt).crt"
        echo "base-image: trusting extra CA $cert"
    done
    hooks="$work/ca"
fi

# minbase: dpkg, apt and the Essential set only. Docs, man pages and apt lists are dropped (images
# run `apt-get update` before they install anything).
set -- --variant=minbase --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*'
if [ -n "$hooks" ]; then
    set -- "$@" \
        --customize-hook="mkdir -p \"\$1/usr/local/share/ca-certificates\"" \
        --customize-hook="sync-in $hooks /usr/local/share/ca-certificates" \
        --customize-hook="chroot \"\$1\" update-ca-certificates"
fi
set -- "$@" --customize-hook="rm -rf \"\$1\"/var/lib/apt/lists/* \"\$1\"/var/cache/apt/*.bin"

echo "base-image: mmdebstrap $SUITE from $MIRROR"
mmdebstrap "$@" "$SUITE" "$work/root.tar" \
    "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main"

docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    --message "mmdebstrap $SUITE minbase + $PACKAGES" \
    "$work/root.tar" "$BASE_IMAGE" >/dev/null
docker image ls "$BASE_IMAGE" --format 'base-image: {{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}'
