"""BentoML serving the same ONNX model with client-supplied features (a peer in bench/serve.py).

    MLPAY_BENCH_MODEL=MODEL_DIR .venv/peers/bentoml/bin/bentoml serve bentoml_service:Scorer --working-dir bench --port PORT

Runs in its own venv (`make bench-peers`). A minimal `@bentoml.service` with 1 worker and one `@bentoml.api`, whose
parameters are the model's inputs (the body bench/features.lua sends: `{"features": [...]}`, plus `history` for a
sequence model), answering `{"score": float}`; onnxruntime on 1 intra-op thread like bench/bare_server.py. BentoML's
defaults otherwise (its access log on). Liveness: GET /readyz; scoring: POST /predict.
"""
import os
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort


@bentoml.service(workers=1)
class Scorer:
    def __init__(self):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(Path(os.environ["MLPAY_BENCH_MODEL"]) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    @bentoml.api
    def predict(self, features: list[float], history: list[list[float]] | None = None) -> dict:
        given = {"features": features, "history": history}
        inputs = {n: np.asarray(given[n], dtype=np.float32)[None] for n in self.names}
        return {"score": float(self.session.run(None, inputs)[0][0])}
