#!/bin/sh
# `make containers`: the container engine, its settings, and the offline base images the tests build FROM.
#
# Idempotent: each step checks before it acts, so a second run takes about a second.
#   1. podman, buildah, skopeo, runc, debootstrap and docker-registry from Debian's packages;
#   2. /etc/containers/containers.conf with the settings these machines need (cgroup v1 "hybrid"
#      layout and a capped RLIMIT_NPROC: no default ulimits, cgroupfs, runc, since crun refuses it);
#   3. localhost/cloudllm-debian:bookworm-KEY, a debootstrap root filesystem imported as an image
#      (no registry is reachable from these machines), KEY derived from what goes in it;
#   4. localhost/cloudllm-torch-base:KEY, that image plus a venv holding the host's own CPU torch
#      wheel: a small stand-in for the CUDA PyTorch base the real image uses.
# Needs root on Debian; anything else stops at step 1 with the reason.
set -eu

SUITE=bookworm
INCLUDE=python3,python3-venv,ca-certificates
DEBIAN_IMAGE_REPO=localhost/cloudllm-debian
TORCH_IMAGE_REPO=localhost/cloudllm-torch-base
HERE=$(cd "$(dirname "$0")" && pwd)

say() { echo "containers: $*"; }

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "containers: needs root on a Debian machine (apt-get); the container tests skip without it" >&2
    exit 2
fi

# 1. the engine
missing=""
for tool in podman buildah skopeo runc debootstrap docker-registry; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    say "installing$missing"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah skopeo runc debootstrap docker-registry >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah skopeo runc debootstrap docker-registry >/dev/null; }
fi
# Debian starts the registry as a service where systemd runs; the tests start their own on loopback.

# 2. the settings (a containers.conf someone else wrote is left alone; we only say what it lacks)
CONF=/etc/containers/containers.conf
MARK="# written by cloudllm's make containers"
if [ ! -e "$CONF" ]; then
    mkdir -p /etc/containers
    cat >"$CONF" <<CONF
$MARK
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
CONF
    say "wrote $CONF"
elif ! grep -q "$MARK" "$CONF"; then
    for setting in 'default_ulimits = \[\]' 'cgroup_manager = "cgroupfs"' 'runtime = "runc"'; do
        grep -q "$setting" "$CONF" || say "warning: $CONF lacks $setting (podman may fail on a cgroup v1 machine)"
    done
fi

# 3. the Debian base, made offline
MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
[ -n "$MIRROR" ] || MIRROR=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
DEBIAN_KEY=$(printf '%s %s %s' "$SUITE" "$INCLUDE" "$(dpkg-query -W -f '${Version}' debootstrap)" | sha256sum | cut -c1-12)
DEBIAN_IMAGE=$DEBIAN_IMAGE_REPO:$SUITE-$DEBIAN_KEY
if ! podman image exists "$DEBIAN_IMAGE"; then
    say "making $DEBIAN_IMAGE with debootstrap from $MIRROR (about a minute)"
    rootfs=$(mktemp -d /var/tmp/cloudllm-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
        || { tail -n 5 "$rootfs.log" >&2; echo "containers: debootstrap failed (full log: $rootfs.log)" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --quiet - "$DEBIAN_IMAGE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"
    trap - EXIT
fi

# 4. the torch base: the host's CPU torch wheel, found where the host's pip finds it
WHEEL=$(python3 - <<'PY'
import glob, os, subprocess
out = subprocess.run(["python3", "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
dirs = [os.environ.get("PIP_FIND_LINKS", "")]
dirs += [line.split("=", 1)[1].strip("'\"") for line in out.splitlines() if "find-links" in line]
wheels = sorted(w for d in " ".join(dirs).split() for w in glob.glob(os.path.join(d, "torch-*cpu*-cp311-*.whl")))
print(wheels[-1] if wheels else "")
PY
)
if [ -z "$WHEEL" ]; then
    echo "containers: no CPU torch wheel for Python 3.11 in pip's find-links; put one there (pip download torch --index-url https://download.pytorch.org/whl/cpu)" >&2
    exit 1
fi
TORCH_KEY=$(printf '%s %s %s' "$DEBIAN_IMAGE" "$(basename "$WHEEL")" "$(cat "$HERE/torch-base.Containerfile")" | sha256sum | cut -c1-12)
TORCH_IMAGE=$TORCH_IMAGE_REPO:$TORCH_KEY
if ! podman image exists "$TORCH_IMAGE"; then
    say "making $TORCH_IMAGE from $(basename "$WHEEL") (about a minute)"
    wheels=$(dirname "$WHEEL")
    cert=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    buildah bud --quiet --isolation chroot --network host --layers \
        --build-arg BASE="$DEBIAN_IMAGE" --build-arg TORCH_WHEEL="/wheels/$(basename "$WHEEL")" \
        -v "$wheels:/wheels:ro" -v "$cert:/host-ca.crt:ro" \
        -f "$HERE/torch-base.Containerfile" -t "$TORCH_IMAGE" "$HERE" >/dev/null
fi
podman tag "$TORCH_IMAGE" "$TORCH_IMAGE_REPO:latest"
say "ready: base $TORCH_IMAGE_REPO:latest ($TORCH_IMAGE)"
