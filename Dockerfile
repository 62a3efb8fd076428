# A swarm node, bootstrap peer or client: `docker compose up` runs a whole local swarm (docker-compose.yml).
# CPU torch by default; for NVIDIA GPUs build with
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t swarm:cuda .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    SWARM_CACHE=/cache

WORKDIR /app
# torch first, from the chosen index, so the project's dependencies never pull another build
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY swarm ./swarm
RUN pip install .
COPY docker/identities ./docker/identities

VOLUME ["/cache"]
ENTRYPOINT ["swarm"]
CMD ["--help"]
