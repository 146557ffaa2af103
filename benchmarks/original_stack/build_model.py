"""Build the original system's final CNN with random weights and save it as .h5.

The original (TensorFlow/Keras, 128x128x1 grayscale) stacked five conv blocks of
64, 128, 256, 512 and 1024 filters, each Conv2D 3x3 -> BatchNorm -> ReLU -> MaxPool 2x2,
then Flatten -> Dense(128) -> Dense(1, sigmoid): 8,374,785 parameters (~8.4M), of which
the Flatten -> Dense(128) layer alone holds 4*4*1024*128 + 128 = 2.1M. Weights are random:
speed and memory do not depend on their values, and no trained weights are shipped.

Usage (with benchmarks/.venv-original/bin/python): python build_model.py OUT.h5
Prints one JSON line: {"path", "params", "tensorflow", "keras"}.
"""

from __future__ import annotations

import json
import sys

import keras
import tensorflow as tf
from keras import layers

INPUT_SHAPE = (128, 128, 1)
FILTERS = (64, 128, 256, 512, 1024)


def build() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape=INPUT_SHAPE)])
    for filters in FILTERS:
        model.add(layers.Conv2D(filters, 3, padding="same"))
        model.add(layers.BatchNormalization())
        model.add(layers.Activation("relu"))
        model.add(layers.MaxPooling2D(2))
    model.add(layers.Flatten())
    model.add(layers.Dense(128, activation="relu"))
    model.add(layers.Dense(1, activation="sigmoid"))
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
    return model


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].endswith((".h5", ".keras")):
        print("usage: python build_model.py OUT.h5", file=sys.stderr)
        return 2
    model = build()
    model.save(argv[0])
    print(
        json.dumps(
            {
                "path": argv[0],
                "params": int(model.count_params()),
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
