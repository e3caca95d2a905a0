"""KServe's Python ModelServer serving the same ONNX model with client-supplied features (a peer in bench/serve.py).

    .venv/peers/kserve/bin/python bench/kserve_server.py MODEL_DIR PORT [--quiet]

Runs in its own venv (`make bench-peers`: kserve 0.21.0 needs pandas<3, protobuf<7 and psutil<6, which mlpay's
pins do not allow). A minimal `kserve.Model`: its v1 predict route takes the body bench/features.lua sends
(`{input_name: [...]}`) as a dict and answers `{"score": float}`, onnxruntime on 1 intra-op thread like
bench/bare_server.py, 1 uvicorn worker. Liveness: GET /v1/models/model (200 once the model is ready); scoring:
POST /v1/models/model:predict.

By default KServe logs every request three times: uvicorn's access line, timing-asgi's middleware timings and its own
latency line (both on the `kserve.trace` logger). --quiet turns all three off: `enable_latency_logging=False`
(`--enable_latency_logging false` on its command line) and a logging config with `kserve.trace` and `uvicorn.access`
at WARNING (what `--log_config_file` would pass). gRPC is off: only REST is measured, and its default port (8081)
would clash with a second server.
"""
import copy
import sys
from pathlib import Path

import kserve
import numpy as np
import onnxruntime as ort
from kserve import logging as kserve_logging


class OnnxScorer(kserve.Model):
    def __init__(self, name: str, model_dir: Path):
        super().__init__(name)
        self.model_dir = model_dir
        self.load()

    def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: dict, headers: dict | None = None) -> dict:
        inputs = {n: np.asarray(payload[n], dtype=np.float32)[None] for n in self.names}
        return {"score": float(self.session.run(None, inputs)[0][0])}


def quiet_logging():
    "KServe's logging config with its per-request lines (access log, trace timings) below the level they log at."
    config = copy.deepcopy(kserve_logging.KSERVE_LOG_CONFIG)
    for name in ("kserve.trace", "uvicorn.access"): config["loggers"][name]["level"] = "WARNING"
    kserve_logging.configure_logging(config)  # ModelServer leaves a configured logger alone


if __name__ == "__main__":
    model_dir, port, quiet = Path(sys.argv[1]), int(sys.argv[2]), "--quiet" in sys.argv[3:]
    if quiet: quiet_logging()
    server = kserve.ModelServer(http_port=port, enable_grpc=False, workers=1, enable_latency_logging=not quiet)
    server.start([OnnxScorer("model", model_dir)])
