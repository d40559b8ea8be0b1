#!/usr/bin/env bash
# Run the test suite (installs the project with its test and Ray extras into .venv first).
source "$(dirname "$0")/_venv.sh" "test,ray"

# Azure's inference server conflicts with the project's pins, so it gets its own environment. The
# test that serves the scoring module with it is skipped when this install fails (for example offline).
if [ ! -x .venv-azureml/bin/azmlinfsrv ]; then
    (python3 -m venv .venv-azureml && .venv-azureml/bin/python -m pip install --quiet azureml-inference-server-http) \
        || echo "note: azureml-inference-server-http could not be installed; its test will be skipped" >&2
fi
if [ -x .venv-azureml/bin/azmlinfsrv ]; then
    export VIRCHOW_AZUREML_PYTHON="$PWD/.venv-azureml/bin/python"
fi

.venv/bin/python -m pytest "$@"
