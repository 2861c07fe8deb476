#!/usr/bin/env bash
# Installs the built-in dataset (Fashion-MNIST) from Debian's package `dataset-fashion-mnist`
# when it is missing and apt-get can be used (root). Otherwise says how to get it; the library
# also looks at $FASHION_MNIST_DIR and can download it with torchvision when a network exists.
set -u
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/t10k-images-idx3-ubyte.gz" ] || [ -n "${FASHION_MNIST_DIR:-}" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist \
    && exit 0
fi
echo "note: Fashion-MNIST is not installed. Install it with" >&2
echo "  sudo apt-get install dataset-fashion-mnist" >&2
echo "or set FASHION_MNIST_DIR to a folder holding the four IDX .gz files." >&2
exit 0
