# User-code image for the dbb_orchestration code location (Dagster Helm chart, K8sRunLauncher).
# The chart starts it as `dagster api grpc -h 0.0.0.0 -p 3030 -m dbb_orchestration.definitions`;
# launched runs use the same image. Configuration comes only from the environment (docs/deployment.md).
# The image's instance config is deploy/dagster.yaml (Postgres from DAGSTER_PG_*) at
# $DAGSTER_HOME/dagster.yaml, the one place Dagster reads it; under Helm the chart mounts its rendering
# of the same settings over it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home

WORKDIR /opt/dagster/app
COPY pyproject.toml README.md ./
COPY dbb_orchestration ./dbb_orchestration
RUN pip install '.[sentry,k8s]' \
 && mkdir -p "$DAGSTER_HOME" \
 && useradd --create-home --uid 10001 dagster \
 && chown -R dagster "$DAGSTER_HOME"
COPY deploy/dagster.yaml ${DAGSTER_HOME}/dagster.yaml
COPY workspace.yaml ./
USER dagster

EXPOSE 3030
CMD ["dagster", "api", "grpc", "-h", "0.0.0.0", "-p", "3030", "-m", "dbb_orchestration.definitions"]
