-- done() for the wrk scripts here: one "WRK_RESULT {json}" line that benchmarks/serving.py
-- parses (benchmarks/cache.py too), then a human-readable line. Loaded with dofile() by
-- corpus.lua and ../cache_bodies.lua, so the two print exactly the same thing.

function done(summary, latency, requests_stats)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT {\"requests\":%.0f,\"duration_us\":%.0f,\"bytes\":%.0f," ..
    "\"connect\":%.0f,\"read\":%.0f,\"write\":%.0f,\"status\":%.0f,\"timeout\":%.0f," ..
    "\"p50_us\":%.0f,\"p90_us\":%.0f,\"p99_us\":%.0f,\"mean_us\":%.1f,\"max_us\":%.0f}\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
  io.write(string.format("latency p50 %.2f ms  p90 %.2f ms  p99 %.2f ms;  " ..
    "2xx/3xx %.0f  non-2xx/3xx %.0f  socket errors %.0f\n",
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    summary.requests - e.status, e.status, e.connect + e.read + e.write + e.timeout))
end
