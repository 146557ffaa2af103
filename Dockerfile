# syntax=docker/dockerfile:1
# The serving image: onnxruntime + numpy + Pillow + FastAPI and the shipped model. No torch.
#   docker build -t pneumonia-detection . && docker run -p 8000:8000 pneumonia-detection
# `make container` builds it and proves it at 0.1 CPU / 256 MB (benchmarks/container_check.py).

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
# Then drop what serving never loads, so the copied venv holds only the service: the plotting
# library and what only it pulls in (`pneumonia evaluate --plots` is not run in this image;
# each name is skipped once the package no longer depends on it), the test suites that
# wheels ship, type stubs, build tooling (numpy's distutils and f2py; onnxruntime's
# transformer fusion, quantization and conversion tools: an InferenceSession imports none of
# it), pydicom's sample DICOM files (3 MB, read only by its get_testdata_file), and last pip
# and setuptools. Compiled .pyc files stay: they spare every cold start at
# 0.1 CPU the compiling of the whole import chain.
RUN /opt/venv/bin/pip uninstall -y -q matplotlib contourpy cycler fonttools kiwisolver pyparsing \
        python-dateutil six \
    && cd /opt/venv/lib/python3.11/site-packages \
    && find . -depth -type d -name tests -exec rm -rf {} + \
    && find . -name '*.pyi' -delete \
    && rm -rf numpy/distutils numpy/f2py onnxruntime/transformers onnxruntime/quantization \
        onnxruntime/tools onnxruntime/datasets pydicom/data/test_files \
    && /opt/venv/bin/pip uninstall -y -q pip setuptools

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
# OPENBLAS_NUM_THREADS=1: numpy's BLAS (the input check's small matrix products) would
# otherwise start a thread per host core, spending the container's CPU quota on spinning.
ENV PATH=/opt/venv/bin:$PATH \
    OPENBLAS_NUM_THREADS=1 \
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
