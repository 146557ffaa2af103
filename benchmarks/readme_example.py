"""The README's example answer: the shipped model's /predict answer for one real film.

Runs the service in-process (its own lifespan, the shipped model or --model) and posts one film
as `curl -F file=@chest_xray.jpeg` does; prints the JSON body with one field a line, which is
what README.md shows under "Using the API" (tests/test_docs.py checks that the model's name,
version, threshold and digests there are the shipped file's).

Usage::

    .venv/bin/python benchmarks/readme_example.py \\
        --image ../shared/data/chest_xray/train/PNEUMONIA/person1000_bacteria_2931.jpeg
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

from fastapi.testclient import TestClient

from pneumonia.predictor import shipped_model_path
from pneumonia.serve.app import create_app
from pneumonia.serve.settings import Settings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=shipped_model_path())
    a = ap.parse_args()
    with TestClient(create_app(Settings(model_path=a.model))) as client:
        for _ in range(500):
            if client.get("/ready").status_code == 200:
                break
            threading.Event().wait(0.02)
        body = client.post(
            "/predict", files={"file": ("chest_xray.jpeg", a.image.read_bytes(), "image/jpeg")}
        ).json()
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in body.items()]
    print("{\n" + ",\n".join(lines) + "\n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
