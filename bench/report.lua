-- Shared by every bench script: one machine-readable line when wrk is done.
function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  io.write(string.format(
    "WRK_RESULT {\"requests\": %d, \"seconds\": %.3f, \"rps\": %.1f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, " ..
    "\"max_ms\": %.3f, \"status_errors\": %d, \"socket_errors\": %d}\n",
    summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
