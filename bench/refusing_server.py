"""The refusal floor: mlpay's edge (uvicorn, the API key, `mlpay.admission`) answering every request with a 503 at once.

What a refusal costs the HTTP stack alone, for bench/resilience.py's overload table: the same clients, nothing scored.

    python bench/refusing_server.py PORT   # MLPAY_API_KEY from the environment
"""
import os
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse

from mlpay.admission import Admission
from mlpay.serve import EdgeMiddleware

adm = Admission(0.003, 1.0)
adm.cost_s, adm.queued = 1.0, 1  # as if a second of work were queued: every request is refused on arrival
app = Starlette()
app.add_middleware(EdgeMiddleware, api_key=os.environ["MLPAY_API_KEY"], max_in_flight=256, max_body_bytes=1 << 20, admission=adm)
app.add_route("/health", lambda request: PlainTextResponse("ok"))

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
