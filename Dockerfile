# syntax=docker/dockerfile:1.7
# Two targets, both non-root, no secrets baked in (credentials arrive as env vars from Kubernetes Secrets):
#   customcrafter  (default, last stage): the one image every pipeline component runs in (KFP base_image,
#                   install_kfp_package=False) and the CLI image. CUDA PyTorch base; its torch is kept.
#   mlflow-server  the tracking server of k8s/ (MLflow + basic auth + Postgres driver + S3 client).
# Build: docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t ghcr.io/customcrafter/customcrafter:0.1.0 .
#        (GIT_COMMIT: the code lineage tag on registered models; the image holds no .git)
#        docker build --target mlflow-server -t ghcr.io/customcrafter/customcrafter-mlflow:0.1.0 .

FROM python:3.11.11-slim-bookworm AS mlflow-server
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true
# Same MLflow as the package pins, so the server and the pipeline clients speak the same version.
RUN pip install "mlflow[auth]==3.17.2" "boto3==1.44.5" "psycopg2-binary==2.9.13"
RUN groupadd --gid 1000 mlflow && useradd --uid 1000 --gid 1000 --create-home mlflow
USER 1000:1000
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]

FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime AS customcrafter
# HF_HOME sits on the model-cache PVC (k8s/base/model-cache-pvc.yaml, mounted at /cache) so base-model
# weights are downloaded once per cluster; CUSTOMCRAFTER_CACHE too, so an original checkpoint is converted once per
# cluster (pods converting at once keep the first folder written) and class images are generated once. Telemetry is off; HF_HUB_OFFLINE is left to the caller, because
# the first run on a cluster has to fill the cache. torch.compile's caches (inductor's generated kernels, FX and
# AOTAutograd graphs) sit there too, so a pod pays the minutes of compilation of `--compile` only when no pod compiled
# the same model and shapes before (tiny model on a CPU: 166 s cold, 28 s from the cache).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    CUSTOMCRAFTER_CACHE=/cache/customcrafter \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    GX_ANALYTICS_ENABLED=false
# git: DVC and the git-commit tag on registered models.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/customcrafter
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
# Keep the base image's CUDA torch: pin it with a constraints file generated from the image itself, so pip
# never replaces it with a wheel from PyPI (several GB, possibly a different CUDA build); the model libraries take
# the versions CI passed with (constraints.txt, less its CPU torch pin).
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
    && grep -v '^torch==' constraints.txt >> /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt . \
    && python -c "import torch, customcrafter; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/app app \
    && mkdir -p /cache /workspace \
    && chown 1000:1000 /cache /workspace
# Declared last so a new commit rebuilds only this layer. Required: a model registered from an image without it would
# carry no code lineage, so the build stops here instead.
ARG GIT_COMMIT=""
RUN test -n "${GIT_COMMIT}" \
    || { echo 'GIT_COMMIT is empty: build with --build-arg GIT_COMMIT=$(git rev-parse HEAD)' >&2; exit 1; }
ENV CUSTOMCRAFTER_GIT_COMMIT=${GIT_COMMIT}
# Numeric user so Kubernetes can verify runAsNonRoot without a runAsUser override.
USER 1000:1000
WORKDIR /workspace
CMD ["customcrafter", "--help"]
