#!/usr/bin/env bash
# Build the xffl-cwl OCI image (client and aggregator in one) with podman, from a Debian base made
# here with debootstrap, this checkout and a wheelhouse of its dependencies. Nothing but Debian's
# mirror and the package index pip is configured with is reached, and only before the image build;
# the build itself runs with no network.
#
#   bash containers/build.sh                  # localhost/xffl-cwl:VERSION (CPU torch), smoke-tested
#   bash containers/build.sh --save DIR       # also DIR/xffl-cwl-TAG.tar (docker-archive, for apptainer/podman load)
#   bash containers/build.sh --variant cuda   # localhost/xffl-cwl:VERSION-cuda: PyPI's CUDA torch (several GB)
#   bash containers/build.sh --variant rocm   # localhost/xffl-cwl:VERSION-rocm: torch from PyTorch's ROCm index
#
# An image whose inputs (recipe, base, checkout files, dependency pins, torch) did not change is
# kept, not rebuilt (--force rebuilds). Knobs: XFFL_DEBIAN_MIRROR, XFFL_BUILD_CACHE, XFFL_TORCH
# (a pip requirement for torch), XFFL_TORCH_INDEX (an extra index for it).
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."

variant=cpu save="" force=0 smoke=1
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant=${2:?--variant needs cpu, cuda or rocm}; shift 2 ;;
    --save) save=${2:?--save needs a folder}; [[ $save = /* ]] || save=$caller/$save; shift 2 ;;
    --force) force=1; shift ;;
    --no-smoke) smoke=0; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
die() { echo "build.sh: error: $*" >&2; exit 2; }
command -v podman >/dev/null || die "podman is not installed (Debian: apt-get install podman buildah debootstrap uidmap)"
command -v debootstrap >/dev/null || die "debootstrap is not installed (Debian: apt-get install debootstrap)"

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
torch_version=2.13.0
# cpu: PyTorch's +cpu wheel (on disk here; elsewhere XFFL_TORCH_INDEX=https://download.pytorch.org/whl/cpu);
# cuda: PyPI's Linux torch, which is the CUDA build; rocm: PyTorch's ROCm index. The image checks it got that one.
case "$variant" in
  cpu) tag=$version torch=${XFFL_TORCH:-torch==$torch_version+cpu} ;;
  cuda) tag=$version-cuda torch=${XFFL_TORCH:-torch==$torch_version} ;;
  rocm) tag=$version-rocm torch=${XFFL_TORCH:-torch==$torch_version}
        index=${XFFL_TORCH_INDEX:-https://download.pytorch.org/whl/rocm6.4} ;;
  *) die "--variant must be cpu, cuda or rocm, not $variant" ;;
esac
index=${index:-${XFFL_TORCH_INDEX:-}}
pip_env=()
# a GPU variant must not take a CPU wheel that pip's configuration (find-links) offers for the same version
[ "$variant" = cpu ] || pip_env=(env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null)
image=localhost/xffl-cwl:$tag
suite=bookworm mirror=${XFFL_DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=localhost/xffl-cwl-base:$suite-1  # -N: the base's package list
cache=${XFFL_BUILD_CACHE:-/var/tmp/xffl-cwl-build}/$tag
mkdir -p "$cache"
started=$(date +%s)

# 1. The base: a minimal Debian with Python, made from the distribution's mirror (kept once made).
if [ "$force" = 1 ] || ! podman image exists "$base"; then
  echo "build.sh: making the base $base with debootstrap from $mirror" >&2
  rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,tini "$suite" "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $cache/debootstrap.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar --numeric-owner -C "$rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
  rm -rf "$rootfs"; trap - EXIT
fi
base_id=$(podman image inspect --format '{{.Id}}' "$base")

# 2. The checkout's files as they are now (committed or not), and the pins of the tested environment.
context="$cache/context"
rm -rf "$context"; mkdir -p "$context/src" "$context/wheels"
git ls-files -co --exclude-standard -z -- pyproject.toml README.md xffl_cwl streamflow_plugins cwl slurm \
  | xargs -0 cp --parents -P -t "$context/src"
python3 -m pip freeze --exclude-editable 2>/dev/null | grep -v -E '^(torch|xffl-cwl)[=@ ]| @ ' >"$context/constraints.txt" || true
inputs=sha256:$( {
  printf 'variant=%s torch=%s index=%s base=%s\n' "$variant" "$torch" "$index" "$base_id"
  cat containers/Containerfile containers/build.sh "$context/constraints.txt"
  (cd "$context/src" && find . \( -type f -o -type l \) -print0 | LC_ALL=C sort -z | while IFS= read -r -d '' f; do
     if [ -L "$f" ]; then printf 'L %s %s\n' "$f" "$(readlink "$f")"; else printf 'F %s %s\n' "$f" "$(sha256sum <"$f" | cut -c1-64)"; fi
   done)
} | sha256sum | cut -c1-64)

if [ "$force" = 0 ] && podman image exists "$image" \
   && [ "$(podman image inspect --format '{{index .Labels "org.xffl-cwl.inputs"}}' "$image")" = "$inputs" ]; then
  echo "build.sh: $image is up to date (inputs $inputs)" >&2
else
  # 3. The wheelhouse: this checkout and every dependency, pinned as tested; torch of the variant.
  echo "build.sh: collecting wheels ($torch${index:+ from $index})" >&2
  pip_index=()
  [ -n "$index" ] && pip_index=(--extra-index-url "$index")
  "${pip_env[@]}" python3 -m pip wheel --quiet --disable-pip-version-check -w "$context/wheels" -c "$context/constraints.txt" \
    "${pip_index[@]}" "$torch" "$context/src" >"$cache/wheels.log" 2>&1 \
    || die "collecting wheels failed (no $torch? for the CPU variant set XFFL_TORCH_INDEX=https://download.pytorch.org/whl/cpu); see $cache/wheels.log"
  printf 'xffl-cwl==%s\n%s\n' "$version" "$torch" >"$context/wheels/requirements.txt"
  revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
  [ -z "$(git status --porcelain -- pyproject.toml xffl_cwl streamflow_plugins cwl slurm 2>/dev/null)" ] || revision=$revision-dirty
  # 4. The image, with no network: pip installs from the bound wheelhouse only.
  echo "build.sh: building $image" >&2
  previous=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
  podman build --quiet --network none --layers=false --timestamp 0 -f containers/Containerfile \
    --build-arg BASE="$base" --build-arg VERSION="$version" --build-arg VARIANT="$variant" \
    --build-arg IMAGE="$image" --build-arg INPUTS="$inputs" --build-arg REVISION="$revision" \
    -t "$image" "$context" >"$cache/build.log" 2>&1 || die "the image build failed; see $cache/build.log"
  # the image this one replaces, now untagged, would only fill the disk
  [ -z "$previous" ] || [ "$previous" = "$(podman image inspect --format '{{.Id}}' "$image")" ] \
    || podman rmi "$previous" >/dev/null 2>&1 || true
fi
rm -rf "$context"

# 5. Smoke test: the CLI, then two training steps on demo assets, inside the image with no network.
if [ "$smoke" = 1 ]; then
  podman run --rm --network none "$image" sh -c '
    set -e
    xffl-cwl --version
    xffl-cwl demo-assets --out /tmp/demo --facilities 1 --samples 40 --test-samples 8 >/dev/null
    xffl-cwl train --model /tmp/demo/model --dataset /tmp/demo/data/leonardo --out /tmp/demo/update \
      --facility leonardo --local-steps 2 --seq-len 32 --no-progress >/dev/null
    test -s /tmp/demo/update/update.json && echo "smoke: 2 training steps ran in the image"' >"$cache/smoke.log" 2>&1 \
    || { cat "$cache/smoke.log" >&2; die "the smoke test of $image failed"; }
  sed 's/^/build.sh: /' "$cache/smoke.log" >&2
fi

if [ -n "$save" ]; then
  mkdir -p "$save"
  archive="$save/xffl-cwl-$tag.tar"
  if [ ! -s "$archive" ] || [ "$(tar -xOf "$archive" manifest.json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Config"].split(".")[0].split("/")[-1])' 2>/dev/null)" != "$(podman image inspect --format '{{.Id}}' "$image")" ]; then
    podman save --quiet --format docker-archive -o "$archive.part" "$image" && mv "$archive.part" "$archive"
  fi
  echo "build.sh: saved $archive ($(du -m "$archive" | cut -f1) MiB)" >&2
fi

size=$(podman image inspect --format '{{.Size}}' "$image")
echo "build.sh: $image built in $(( $(date +%s) - started )) s, $(( size / 1048576 )) MiB; inputs $inputs" >&2
echo "$image sha256:$(podman image inspect --format '{{.Id}}' "$image")"
