#!/bin/sh
# MLflow's tracking server with its own basic-auth app (`mlflow server --app-name basic-auth`). Its users and
# permissions live in the tracking database (MLFLOW_BACKEND_STORE_URI), beside the runs, so they survive a
# restart; MLflow keeps them in tables of their own. The auth app reads that database from the ini that
# MLFLOW_AUTH_CONFIG_PATH names: it is written here, readable by this user only, because the URI holds the
# database password. The admin user (MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD, at least 12
# characters) and the session key (MLFLOW_FLASK_SERVER_SECRET_KEY) come from the environment; MLflow creates the
# admin at its first start only, so a changed password afterwards goes through its update-password API
# (docs/operations.md, "Log-in"). Other users get READ on what they did not create (default_permission).
# The remaining arguments go to `mlflow server`.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?the tracking database}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?the MLflow admin password (MLFLOW_ADMIN_PASSWORD in docker/.env)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?the MLflow session key (MLFLOW_FLASK_SECRET_KEY in docker/.env)}"
umask 077
ini="$(mktemp -d)/basic_auth.ini"
# configparser interpolates %: a URL-encoded password has some, so each is doubled
uri=$(printf '%s' "$MLFLOW_BACKEND_STORE_URI" | sed 's/%/%%/g')
cat > "$ini" <<INI
[mlflow]
default_permission = READ
database_uri = $uri
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$ini"
exec mlflow server --app-name basic-auth --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" "$@"
