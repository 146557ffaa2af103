"""The original system's API, re-created faithfully but working, for the benchmark only.

As in the original: the Keras model is loaded from an .h5 file when this module is
imported, the upload is decoded with PIL and resized to 128x128, and a blocking
``model.predict`` runs inside an ``async def`` route (so it stalls the event loop while
TensorFlow works). The response is {"filename", "prediction", "probability"}.

The one deliberate change: the original fed a different number of channels at serving time
than the model was trained on; here the image is converted to one grayscale channel so
that every request succeeds and can be timed.

Run: MODEL_PATH=/tmp/model.h5 uvicorn app:app --host 127.0.0.1 --port 8001
"""

import io
import os

import numpy as np
from fastapi import FastAPI, File, UploadFile
from PIL import Image
from tensorflow.keras.models import load_model

MODEL_PATH = os.environ.get("MODEL_PATH", "model.h5")
IMG_SIZE = 128

model = load_model(MODEL_PATH)

app = FastAPI(title="Pneumonia Detection API (original stack, re-created)")


@app.get("/")
async def root():
    return {"message": "Pneumonia Detection API"}


@app.post("/predict")
async def predict(file: UploadFile = File(...)):  # noqa: B008 - as the original wrote it
    contents = await file.read()
    image = Image.open(io.BytesIO(contents)).convert("L")
    image = image.resize((IMG_SIZE, IMG_SIZE))
    x = np.array(image, dtype=np.float32) / 255.0
    x = x.reshape(1, IMG_SIZE, IMG_SIZE, 1)
    p = float(model.predict(x)[0][0])
    label = "PNEUMONIA" if p > 0.5 else "NORMAL"
    return {"filename": file.filename, "prediction": label, "probability": p}
