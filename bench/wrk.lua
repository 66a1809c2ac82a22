-- wrk script for the kizuna benchmark: send the HTTP_PROXY-style request every path gets, then print one
-- machine-readable summary line (parsed by bench/wrk.py).
-- Arguments (after "--"): request target, Host header.  The bytes match bench/paced.py's request_bytes().

function init(args)
   wrk.path = args[1] or "http://bench:80/"
   wrk.headers["Host"] = args[2] or "bench"
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'KIZUNA_WRK {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
