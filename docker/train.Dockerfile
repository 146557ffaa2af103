# syntax=docker/dockerfile:1
# The training image for `docker compose --profile train run --rm train`: CPU torch and the
# training extra. Kept apart from ../Dockerfile so the serving image never carries torch.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# /runs belongs to the user so that a fresh named volume mounted there is writable.
RUN useradd --system --uid 10001 --create-home app && mkdir /runs && chown app /runs
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY artifacts ./artifacts
# PyTorch's CPU index: its torch 2.13.0+cpu sorts above PyPI's 2.13.0, whose Linux wheel
# pulls gigabytes of CUDA libraries.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu '.[train]'
USER app
ENTRYPOINT ["pneumonia"]
CMD ["train", "--help"]
