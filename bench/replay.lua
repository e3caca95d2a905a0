-- wrk script: replay real authorizations (bench/serve.py writes them, one JSON body per line, in time order, from
-- the days after those the server's state was warmed with), so the cards' velocity, the terminals' history and the
-- share of flagged transactions are the data's, not those of random traffic (a velocity attack on every card).
-- Set by the bench: MLPAY_KEY, MLPAY_REPLAY_FILE, MLPAY_REPLAY_START (the first line this run sends: the warm-up
-- run and the measured one send different transactions), optionally MLPAY_DEADLINE_MS.
local key = os.getenv("MLPAY_KEY")
local path = os.getenv("MLPAY_REPLAY_FILE")
local start = tonumber(os.getenv("MLPAY_REPLAY_START") or "0")
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}
if os.getenv("MLPAY_DEADLINE_MS") then headers["X-Deadline-Ms"] = os.getenv("MLPAY_DEADLINE_MS") end
local threads = {}
thread_id, n_threads, wrapped = 0, 1, 0  -- globals: setup's thread:set writes them, done's thread:get reads them

function setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
  for _, t in ipairs(threads) do t:set("n_threads", #threads) end
end

local lines, at = {}, 0
function init(args)
  for line in io.lines(path) do lines[#lines + 1] = line end
  at = start + thread_id  -- the threads interleave: thread k sends lines k, k + n, k + 2n... (time order, nearly)
end

function request()
  local i = at
  at = at + n_threads
  if i >= #lines then wrapped = wrapped + 1; i = i % #lines end  -- past the end: the same ids again (retries)
  return wrk.format("POST", "/predict", headers, lines[i + 1])
end

function done(summary, latency, requests)
  local w = 0
  for _, t in ipairs(threads) do w = w + t:get("wrapped") end
  io.write(string.format("RESULT requests_per_s=%.1f p50_ms=%.3f p99_ms=%.3f errors=%d non2xx=%d wrapped=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, summary.errors.status, w))
end
