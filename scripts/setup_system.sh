#!/usr/bin/env bash
# System packages the project uses, from Debian's archive, installed when missing and when
# apt-get can be used (root):
#   dataset-fashion-mnist  the built-in dataset (/usr/share/datasets/fashion-mnist)
#   chromium               the headless browser of the web-page tests
# Without root or apt-get it only says how to get them; the library also looks for the dataset
# in $FASHION_MNIST_DIR and can download it with torchvision when a network exists, and the
# browser tests are skipped when no Chromium is found.
set -u
need=()
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && [ -z "${FASHION_MNIST_DIR:-}" ]; then
  need+=(dataset-fashion-mnist)
fi
if [ "${SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
  need+=(chromium)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Installing ${need[*]} (Debian packages)..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
    && exit 0
  echo "warning: apt-get could not install ${need[*]}" >&2
fi
for pkg in "${need[@]}"; do
  case "$pkg" in
    dataset-fashion-mnist)
      echo "note: Fashion-MNIST is not installed: run 'sudo apt-get install dataset-fashion-mnist'," >&2
      echo "      or set FASHION_MNIST_DIR to a folder holding the four IDX .gz files." >&2 ;;
    chromium)
      echo "note: Chromium is not installed ('sudo apt-get install chromium'); browser tests will be skipped." >&2 ;;
  esac
done
exit 0
