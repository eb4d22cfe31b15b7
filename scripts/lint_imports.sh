#!/usr/bin/env bash
# import-linter over the package as it is installed. grimp finds submodules by walking the
# `recforge` folder, but data/, models/, trainer/ and serve/ sit beside it (mapped by
# setuptools package-dir), so the check runs on a staged copy with the installed layout.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${VENV:-.venv}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/recforge"
cp -r recforge/. "$stage/recforge/"
for layer in data models trainer serve; do
    cp -r "$layer" "$stage/recforge/$layer"
done
cd "$stage"
PYTHONPATH="$stage" "$REPO/$VENV/bin/lint-imports" "$REPO/pyproject.toml"
