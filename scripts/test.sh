#!/usr/bin/env bash
# Run the test suite (installs the project with its test and Ray extras into .venv first).
source "$(dirname "$0")/_venv.sh" "test,ray"
.venv/bin/python -m pytest "$@"
