-- wrk script: bench/predict.lua's fresh authorizations, sent to the Open Inference Protocol's infer as named tensors
-- (the model's name: MLPAY_MODEL_NAME, default mlpay). Same variables: MLPAY_KEY, MLPAY_ID_BASE, MLPAY_BATCH (rows per
-- request), MLPAY_DEADLINE_MS. Compare with predict.lua on the same server:
--   wrk -t2 -c16 -d10s --latency -s bench/oip.lua http://127.0.0.1:8000/
local key = os.getenv("MLPAY_KEY")
local batch = tonumber(os.getenv("MLPAY_BATCH") or "1")
local id_base = tonumber(os.getenv("MLPAY_ID_BASE") or "100000000")
local path = "/v2/models/" .. (os.getenv("MLPAY_MODEL_NAME") or "mlpay") .. "/infer"
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}
if os.getenv("MLPAY_DEADLINE_MS") then headers["X-Deadline-Ms"] = os.getenv("MLPAY_DEADLINE_MS") end
local counter = 0
local threads = {}
thread_id = 0  -- a global: setup's thread:set writes it (see predict.lua)

function setup(thread)
  thread:set("thread_id", #threads)
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(1000003 * (thread_id + 1) + id_base % 1000003)
end

local function tensor(name, datatype, values)
  return string.format('{"name":"%s","datatype":"%s","shape":[%d],"data":[%s]}', name, datatype, #values, table.concat(values, ","))
end

function request()
  local ids, times, cards, terminals, amounts = {}, {}, {}, {}, {}
  for i = 1, batch do  -- predict.lua's transactions, column by column
    counter = counter + 1
    local seconds = counter % 86400
    ids[i] = string.format("%d", id_base + thread_id * 10000000 + counter)
    times[i] = string.format('"2018-10-01T%02d:%02d:%02d"', math.floor(seconds / 3600), math.floor(seconds / 60) % 60, seconds % 60)
    cards[i], terminals[i] = string.format("%d", math.random(0, 4999)), string.format("%d", math.random(0, 9999))
    amounts[i] = string.format("%.2f", math.random(100, 20000) / 100)
  end
  local body = '{"inputs":[' .. table.concat({tensor("transaction_id", "INT64", ids), tensor("tx_datetime", "BYTES", times),
    tensor("customer_id", "INT64", cards), tensor("terminal_id", "INT64", terminals), tensor("tx_amount", "FP64", amounts)}, ",") .. ']}'
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  io.write(string.format("RESULT requests_per_s=%.1f p50_ms=%.3f p99_ms=%.3f errors=%d non2xx=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, summary.errors.status))
end
