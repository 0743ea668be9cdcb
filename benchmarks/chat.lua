-- wrk script for benchmarks/bench.py: POST chat completion bodies with an API key.
--
-- Environment (read when the script loads, so wrk knows whether requests vary):
--   BENCH_BODIES  request body files separated by ":"; with more than one, they are sent in turn
--   BENCH_KEY     API key, sent as "Authorization: Bearer <key>" (omitted when empty)
-- When the run ends, done() prints one line "BENCH_RESULT {json}" that the driver parses.

local function read_file(path)
   local file = assert(io.open(path, "rb"))
   local data = file:read("*a")
   file:close()
   return data
end

local bodies = {}
for path in string.gmatch(os.getenv("BENCH_BODIES") or "", "[^:]+") do
   bodies[#bodies + 1] = path
end
assert(#bodies > 0, "BENCH_BODIES names no request body")

local key = os.getenv("BENCH_KEY") or ""

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
if key ~= "" then
   wrk.headers["Authorization"] = "Bearer " .. key
end
wrk.body = read_file(bodies[1])

-- Only a mix defines request(): without it wrk builds the request once and reuses the bytes.
if #bodies > 1 then
   local prepared = nil
   local turn = 0
   function request()
      if prepared == nil then
         prepared = {}
         for i, path in ipairs(bodies) do
            prepared[i] = wrk.format(nil, nil, nil, read_file(path))
         end
      end
      turn = turn % #prepared + 1
      return prepared[turn]
   end
end

function done(summary, latency, requests)
   local errors = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, '
         .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
         .. '"latency_us": {"min": %d, "mean": %.1f, "max": %d, '
         .. '"p50": %d, "p90": %d, "p99": %d, "p99_9": %d}}\n',
      summary.requests, summary.duration, summary.bytes,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout,
      latency.min, latency.mean, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
