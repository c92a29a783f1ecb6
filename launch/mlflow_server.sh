#!/usr/bin/env bash
# A local MLflow tracking server for training runs (wraps `primaps-dist mlflow-server`):
#
#   launch/mlflow_server.sh                       # 127.0.0.1:5000, sqlite:///$PWD/mlflow.db, ./mlartifacts
#   MLFLOW_PORT=5001 launch/mlflow_server.sh --log-file mlflow.log
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000    # then train as usual
#
# Loopback only by default: the server has no authentication. MLFLOW_HOST=0.0.0.0 exposes it (with a
# warning); prefer an SSH tunnel. Further flags (--backend-store-uri, --artifacts-destination, --workers,
# --log-file) are passed through. Stops cleanly on Ctrl-C or SIGTERM.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require primaps-dist
exec primaps-dist mlflow-server --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" "$@"
