-- wrk script: a fresh authorization per request (new transaction id, random card, terminal and amount).
-- Set by the benches: MLPAY_KEY, MLPAY_ID_BASE (first transaction id), optionally MLPAY_BATCH (transactions per request),
-- MLPAY_DEADLINE_MS, and MLPAY_CHECK=1 to read every answer (bench/rollout.py's hot swap): its status and the
-- model_version it carries, printed after the RESULT line as one "VERSION <v> <n>" line per version seen and one
-- "STATUS <code> <n>" line per status other than 2xx. Without it no response hook is defined, so wrk neither parses
-- bodies nor calls Lua per answer.
local key = os.getenv("MLPAY_KEY")
local batch = tonumber(os.getenv("MLPAY_BATCH") or "1")
local id_base = tonumber(os.getenv("MLPAY_ID_BASE") or "100000000")  -- a fresh range per wrk run: no request repeats an earlier one
-- MLPAY_DEADLINE_MS: the X-Deadline-Ms sent (bench/serve.py measures capacity, so it grants a second; bench/resilience.py sheds)
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}
if os.getenv("MLPAY_DEADLINE_MS") then headers["X-Deadline-Ms"] = os.getenv("MLPAY_DEADLINE_MS") end
local counter = 0
local threads = {}

-- globals, not locals: setup's thread:set writes, and done's thread:get reads, each thread's globals (a local thread_id
-- once hid the one setup writes: both threads sent the same ids)
thread_id = 0
versions = {}     -- model_version -> answers carrying it
statuses = {}     -- non-2xx status -> answers
answers = 0       -- responses seen (all statuses)
unversioned = 0   -- 2xx answers without a model_version

function setup(thread)
  thread:set("thread_id", #threads)  -- each thread its own id range: the threads never send the same transaction_id
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

local check = os.getenv("MLPAY_CHECK") == "1"
if check then
  function response(status, headers, body)
    answers = answers + 1
    if status < 200 or status > 299 then
      statuses[status] = (statuses[status] or 0) + 1
      return
    end
    local v = body and string.match(body, '"model_version"%s*:%s*"([^"]*)"')
    if v then versions[v] = (versions[v] or 0) + 1 else unversioned = unversioned + 1 end
  end
end

function done(summary, latency, requests)
  local all_versions, all_statuses, n_answers, n_unversioned = {}, {}, 0, 0
  for _, t in ipairs(threads) do
    for v, n in pairs(t:get("versions")) do all_versions[v] = (all_versions[v] or 0) + n end
    for s, n in pairs(t:get("statuses")) do all_statuses[s] = (all_statuses[s] or 0) + n end
    n_answers = n_answers + t:get("answers")
    n_unversioned = n_unversioned + t:get("unversioned")
  end
  local non2xx = summary.errors.status  -- wrk's own count (status > 399) ...
  if check then non2xx = 0; for _, n in pairs(all_statuses) do non2xx = non2xx + n end end  -- ... or every answer read
  io.write(string.format("RESULT requests_per_s=%.1f p50_ms=%.3f p99_ms=%.3f errors=%d non2xx=%d answers=%d unversioned=%d requests=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, non2xx, n_answers, n_unversioned,
    summary.requests))
  for v, n in pairs(all_versions) do io.write(string.format("VERSION %s %d\n", v, n)) end
  for s, n in pairs(all_statuses) do io.write(string.format("STATUS %d %d\n", s, n)) end
end
