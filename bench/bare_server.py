"""The floor: bare FastAPI + orjson + onnxruntime serving the same ONNX model with client-supplied features.

    python bench/bare_server.py MODEL_DIR PORT
"""
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

model_dir, port = Path(sys.argv[1]), int(sys.argv[2])
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
session = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
names = [i.name for i in session.get_inputs()]
app = FastAPI()


@app.get("/health")
def health():
    return Response("ok")


@app.post("/predict")
async def predict(request: Request):
    body = orjson.loads(await request.body())
    inputs = {n: np.asarray(body[n], dtype=np.float32)[None] for n in names}
    return Response(orjson.dumps({"score": float(session.run(None, inputs)[0][0])}), media_type="application/json")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
