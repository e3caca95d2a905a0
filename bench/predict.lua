-- wrk script: a fresh authorization per request (new transaction id, random card, terminal and amount).
-- Set by bench/serve.py: MLPAY_KEY, MLPAY_ID_BASE (first transaction id), optionally MLPAY_BATCH (transactions per request)
-- and MLPAY_DEADLINE_MS.
local key = os.getenv("MLPAY_KEY")
local batch = tonumber(os.getenv("MLPAY_BATCH") or "1")
local id_base = tonumber(os.getenv("MLPAY_ID_BASE") or "100000000")  -- a fresh range per wrk run: no request repeats an earlier one
-- MLPAY_DEADLINE_MS: the X-Deadline-Ms sent (bench/serve.py measures capacity, so it grants a second; bench/resilience.py sheds)
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}
if os.getenv("MLPAY_DEADLINE_MS") then headers["X-Deadline-Ms"] = os.getenv("MLPAY_DEADLINE_MS") end
local counter = 0
thread_id = 0  -- a global: `thread:set` in setup writes the thread's globals (a local here hid it: both threads sent the same ids)
local threads = {}

function setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(1000003 * (thread_id + 1) + id_base % 1000003)  -- other cards and amounts in each thread and run
end

local function tx()
  counter = counter + 1
  local id = id_base + thread_id * 10000000 + counter
  local seconds = counter % 86400
  return string.format(
    '{"transaction_id":%d,"tx_datetime":"2018-10-01T%02d:%02d:%02d","customer_id":%d,"terminal_id":%d,"tx_amount":%.2f}',
    id, math.floor(seconds / 3600), math.floor(seconds / 60) % 60, seconds % 60, math.random(0, 4999), math.random(0, 9999), math.random(100, 20000) / 100)
end

function request()
  local body
  if batch == 1 then body = tx() else
    local parts = {}
    for i = 1, batch do parts[i] = tx() end
    body = '{"transactions":[' .. table.concat(parts, ",") .. ']}'
  end
  return wrk.format("POST", "/predict", headers, body)
end

function done(summary, latency, requests)
  io.write(string.format("RESULT requests_per_s=%.1f p50_ms=%.3f p99_ms=%.3f errors=%d non2xx=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, summary.errors.status))
end
