# syntax=docker/dockerfile:1
# The serving image: onnxruntime + numpy + Pillow + FastAPI and the shipped model. No torch.
#   docker build -t pneumonia-detection . && docker run -p 8000:8000 pneumonia-detection

# Build stage: the same `pip install .` that `make serve` runs and CI proves, into a venv
# that the runtime stage copies whole (same base image, same path).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY artifacts ./artifacts
RUN /opt/venv/bin/pip install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MODEL_PATH=/opt/venv/lib/python3.11/site-packages/pneumonia/artifacts/model.onnx \
    HOST=0.0.0.0 \
    PORT=8000
USER app
EXPOSE 8000
# The slim image has no curl; the standard library is enough. Start period: the model loads
# in seconds on a full core but can take much longer under a 0.1-CPU limit.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"
CMD ["pneumonia", "serve"]
