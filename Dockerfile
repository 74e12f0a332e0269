# ddpmseg image for the team services (flow worker, Dask workers). CPU torch by default;
# for GPU workers build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY storage ./storage
COPY flows ./flows
RUN pip install --no-cache-dir .
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false
ENTRYPOINT ["ddpmseg"]
