-- wrk script: POST BODY_FILE with a bearer token taken in turn from
-- TOKENS_FILE (one per line), so a gateway sees a realistic mix of tenants
-- and tokens; prints one machine-readable RESULT line.
-- env: BODY_FILE, TOKENS_FILE, CLOSE=1 (Connection: close, one request
-- per connection), PROXY_V2=1 (with CLOSE=1: each connection starts with
-- a PROXY v2 header from a client address taken in turn, as a balancer
-- writes it)
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
local body = f:read("*a")
f:close()
local tokens = {}
for line in io.lines(os.getenv("TOKENS_FILE")) do
  if #line > 0 then tokens[#tokens + 1] = line end
end
local close = os.getenv("CLOSE") == "1"
local proxy_v2 = os.getenv("PROXY_V2") == "1"
local n = 0

-- PROXY v2, TCP over IPv4 from 198.51.100.X:40000 to 10.0.0.1:443.
local function v2_header(i)
  return "\r\n\r\n\0\r\nQUIT\n" .. string.char(0x21, 0x11, 0, 12, 198, 51, 100, i % 250 + 1,
    10, 0, 0, 1, 0x9c, 0x40, 0x01, 0xbb)
end

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
  local req = wrk.format("POST", nil, headers, body)
  -- wrk parses the first request() of its first thread as HTTP and does
  -- not send it (compare.sh runs one thread).
  if proxy_v2 and n > 1 then req = v2_header(n) .. req end
  return req
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
