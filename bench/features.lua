-- wrk script: one JSON row of client-supplied model inputs (the bare and LitServe-default endpoints).
-- bench/serve.py writes the body to MLPAY_BODY_FILE.
local f = assert(io.open(os.getenv("MLPAY_BODY_FILE")))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  io.write(string.format("RESULT requests_per_s=%.1f p50_ms=%.3f p99_ms=%.3f errors=%d non2xx=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, summary.errors.status))
end
