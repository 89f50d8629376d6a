-- wrk script: POST BODY_FILE with a bearer token taken in turn from
-- TOKENS_FILE (one per line), so a gateway sees a realistic mix of tenants
-- and tokens; prints one machine-readable RESULT line.
-- env: BODY_FILE, TOKENS_FILE, CLOSE=1 (Connection: close, one request
-- per connection)
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
local body = f:read("*a")
f:close()
local tokens = {}
for line in io.lines(os.getenv("TOKENS_FILE")) do
  if #line > 0 then tokens[#tokens + 1] = line end
end
local close = os.getenv("CLOSE") == "1"
local n = 0

function setup(thread)
  thread:set("offset", math.random(#tokens))
end

function request()
  n = n + 1
  local headers = {
    ["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. tokens[(n + (offset or 0)) % #tokens + 1],
  }
  if close then headers["Connection"] = "close" end
  return wrk.format("POST", nil, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_s":%.3f,"rps":%.1f,"p50_ms":%.3f,"p99_ms":%.3f,"p999_ms":%.3f,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency:percentile(99.9) / 1e3,
    e.connect, e.read, e.write, e.status, e.timeout))
end
