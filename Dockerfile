# GPU image: the pipeline with its vLLM extra. Build: docker build -t caprl-pipeline .
# Run:   docker run --gpus all -v /data:/data caprl-pipeline run --stage annotate --shards 0-99 -m manifests/caprl.yaml
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/venv
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv $VIRTUAL_ENV
ENV PATH=$VIRTUAL_ENV/bin:$PATH

WORKDIR /opt/caprl-pipeline
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY stages ./stages
COPY manifests ./manifests
COPY tools ./tools
COPY models ./models
# vLLM brings its own matching torch build; the [gpu] extra installs it.
RUN pip install --upgrade pip && pip install ".[gpu]"

ENTRYPOINT ["python", "-m", "pipeline"]
CMD ["--help"]
