#!/usr/bin/env bash
# Fetch onnxruntime's C/C++ headers (ORT_API_VERSION 21) into third_party/onnxruntime/include/.
#
# No PyPI wheel ships them; Debian trixie's libonnxruntime-dev (1.21.0) does. We download that one package with
# apt-get pointed at a sources file, lists and cache of our own, so the system's apt configuration is left untouched,
# and unpack it with dpkg -x. The machine's Debian keyring verifies the trixie archive.
# Idempotent: does nothing when the headers are already there. Override the mirror with ORT_HEADERS_MIRROR.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
DEST=third_party/onnxruntime
HEADER=$DEST/include/onnxruntime_cxx_api.h
if [ -f "$HEADER" ]; then
  exit 0
fi
MIRROR=${ORT_HEADERS_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-trixie-stable.gpg
if [ ! -f "$KEYRING" ] || ! command -v apt-get >/dev/null; then
  echo "fetch_ort_headers: needs apt-get and $KEYRING (package debian-archive-keyring);" \
    "or unpack onnxruntime 1.21+ headers into $DEST/include yourself" >&2
  exit 1
fi
WORK=$DEST/.apt
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/deb"
printf 'deb [signed-by=%s] %s trixie main\n' "$KEYRING" "$MIRROR" \
  > "$WORK/trixie.list"
APT_OPTS=(
  -o "Dir::Etc::SourceList=$PWD/$WORK/trixie.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$PWD/$WORK/lists" -o "Dir::Cache=$PWD/$WORK/cache"
  -o APT::Sandbox::User=root -qq
)
apt-get "${APT_OPTS[@]}" update
(cd "$WORK/deb" && apt-get "${APT_OPTS[@]}" download libonnxruntime-dev)
DEB=$(ls "$WORK"/deb/libonnxruntime-dev_*.deb)
dpkg -x "$DEB" "$WORK/root"
SRC=$(dirname "$(find "$WORK/root" -name onnxruntime_cxx_api.h | head -n 1)")
if [ ! -f "$SRC/onnxruntime_c_api.h" ]; then
  echo "fetch_ort_headers: $DEB holds no onnxruntime_c_api.h" >&2
  exit 1
fi
mkdir -p "$DEST/include"
cp -r "$SRC"/. "$DEST/include/"
rm -rf "$WORK"
grep -m1 "define ORT_API_VERSION" "$DEST/include/onnxruntime_c_api.h" | sed 's/^/fetch_ort_headers: /'
