-- wrk script: each request is a purchase of one unit by one of the shoppers whose
-- tokens are in $TOKENS, with a unique Idempotency-Key. $DELAY_MS > 0 paces each
-- connection (used for "latency at half the maximum rate").
local tokens = {}
local counter = 0
local sale = os.getenv("SALE")
local delay_ms = tonumber(os.getenv("DELAY_MS") or "0")
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

function init(args)
  for line in io.lines(os.getenv("TOKENS")) do tokens[#tokens + 1] = line end
  path = "/v1/flash-sales/" .. sale .. "/purchase"
end

function request()
  counter = counter + 1
  local token = tokens[(counter % #tokens) + 1]
  return wrk.format("POST", path, {
    ["Authorization"] = "Bearer " .. token,
    ["Idempotency-Key"] = id .. "-" .. counter,
    ["Content-Type"] = "application/json",
  }, '{"quantity":1}')
end

if delay_ms > 0 then
  function delay() return delay_ms end
end

function done(summary, latency, requests)
  io.write(string.format(
    "RESULT requests=%d non2xx=%d errors=%d rps=%.0f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f p999_ms=%.3f max_ms=%.3f\n",
    summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, latency.max / 1000))
end
