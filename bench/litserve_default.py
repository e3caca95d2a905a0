"""LitServe with its default settings serving the same ONNX model with client-supplied features.

    python bench/litserve_default.py MODEL_DIR PORT
"""
import sys
from pathlib import Path

import litserve as ls
import numpy as np
import onnxruntime as ort


class DefaultAPI(ls.LitAPI):
    def __init__(self, model_dir):
        super().__init__()
        self.model_dir = Path(model_dir)

    def setup(self, device):
        self.session = ort.InferenceSession(str(self.model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def decode_request(self, request):
        return {n: np.asarray(request[n], dtype=np.float32)[None] for n in self.names}

    def predict(self, x):
        return float(self.session.run(None, x)[0][0])

    def encode_response(self, output):
        return {"score": output}


ls.server._MCP_AVAILABLE = False  # as mlpay.serve: LitServe 0.2.19 mounts an MCP endpoint needing mcp 1.x whenever `mcp` is installed

if __name__ == "__main__":
    ls.LitServer(DefaultAPI(sys.argv[1])).run(host="127.0.0.1", port=int(sys.argv[2]), generate_client_file=False, log_level="warning")
