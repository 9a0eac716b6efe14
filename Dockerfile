# blockcsi container image: the driver binary on a small Debian with the filesystem tools it
# runs (blkid from util-linux, mkfs.ext4/resize2fs from e2fsprogs, mkfs.xfs/xfs_growfs from
# xfsprogs). Loop devices and mounts are done with syscalls, so nothing else is needed.
#
#   docker build -t blockcsi:0.1.0 .        (BuildKit: `docker buildx build` or buildctl)
#
# Both base images are build arguments, so the image can be built without a registry from
# images assembled locally. The builder and the runtime must share a C library version: keep
# them on the same Debian release. A runtime base that already has the three packages is used
# as is (no apt-get at all); otherwise they are installed from the Debian archive.
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-slim-trixie
ARG BASE_IMAGE=docker.io/library/debian:trixie-slim

FROM ${BUILDER_IMAGE} AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
# Cargo reads every target the manifest declares, the bench included, before it builds one.
COPY benches ./benches
COPY proto ./proto
COPY src ./src
# BuildKit cache mounts keep the crate downloads and the target directory between builds, so a
# rebuild after a source change compiles only this crate. They are not part of any layer: the
# binary is copied out in the same step.
RUN --mount=type=cache,id=blockcsi-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=blockcsi-target,target=/src/target \
    CARGO_HOME=/usr/local/cargo cargo build --release --locked --bin blockcsi \
    && install -D -m 0755 target/release/blockcsi /out/blockcsi

FROM ${BASE_IMAGE}
RUN set -eu; \
    missing=""; \
    for p in e2fsprogs xfsprogs util-linux; do \
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"; \
    done; \
    if [ -n "$missing" ]; then \
      apt-get update; \
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing; \
      rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=builder /out/blockcsi /usr/local/bin/blockcsi
ENTRYPOINT ["/usr/local/bin/blockcsi"]
CMD ["serve"]
