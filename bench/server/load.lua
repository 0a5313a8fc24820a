-- wrk script for the bench/server scripts. TARGET=healthz: GET /healthz, built by this
-- script so it pays the same Lua cost as a purchase. TARGET=purchase: each request buys
-- one unit of sale $SALE as one of the shoppers whose tokens are in $TOKENS, with a
-- unique Idempotency-Key (unique across runs against the same server too, so a second
-- run buys instead of replaying the first one's keys). DELAY_MS > 0 paces each
-- connection.
--
-- The requests are built before the run starts (PREBUILT of them, default 400,000), so
-- during the run the generator only hands over a string it already has, as it does for
-- a static request: building one purchase with wrk.format costs ~6 µs of the generator's
-- CPU, which on a machine shared with the server is CPU the server does not get
-- (BENCHMARKS.md, "Requests built before the run"). A healthz run that needs more sends
-- them again; a purchase run builds the rest as it goes (each needs its own key) and
-- says how many in its RESULT line (live=N).
local target = os.getenv("TARGET") or "purchase"
local delay_ms = tonumber(os.getenv("DELAY_MS") or "0")
local prebuilt_count = tonumber(os.getenv("PREBUILT") or "400000")
local tokens = {}
local counter = 0
local prebuilt = {}
local next_id = 0
local run = os.getenv("RUN") or tostring(os.time())
local threads = {}
live = 0

function setup(thread)
  thread:set("id", run .. "-" .. next_id)
  next_id = next_id + 1
  threads[#threads + 1] = thread
end

local function build()
  counter = counter + 1
  if target == "healthz" then
    return wrk.format("GET", "/healthz", { ["X-Request"] = tostring(counter) })
  end
  return wrk.format("POST", path, {
    ["Authorization"] = "Bearer " .. tokens[(counter % #tokens) + 1],
    ["Idempotency-Key"] = id .. "-" .. counter,
    ["Content-Type"] = "application/json",
  }, '{"quantity":1}')
end

function init(args)
  if target == "purchase" then
    for line in io.lines(os.getenv("TOKENS")) do tokens[#tokens + 1] = line end
    path = "/v1/flash-sales/" .. os.getenv("SALE") .. "/purchase"
  end
  for i = 1, prebuilt_count do prebuilt[i] = build() end
end

local sent = 0
if target == "healthz" and prebuilt_count > 0 then
  -- Any healthz request may go twice: start over rather than build more.
  function request()
    sent = sent % prebuilt_count + 1
    return prebuilt[sent]
  end
else
  function request()
    sent = sent + 1
    local r = prebuilt[sent]
    if r then
      prebuilt[sent] = nil
      return r
    end
    live = live + 1
    return build()
  end
end

if delay_ms > 0 then
  function delay() return delay_ms end
end

function done(summary, latency, requests)
  local built_live = 0
  for _, thread in ipairs(threads) do built_live = built_live + (thread:get("live") or 0) end
  io.write(string.format(
    "RESULT requests=%d non2xx=%d errors=%d rps=%.0f ok_rps=%.0f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f p999_ms=%.3f max_ms=%.3f live=%d\n",
    summary.requests, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.requests / (summary.duration / 1e6),
    (summary.requests - summary.errors.status) / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, latency.max / 1000, built_live))
end
