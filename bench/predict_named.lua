-- POST a named segmentation's /predict as one logged-in user, taking pre-built JSON bodies in turn.
-- BENCH_PATH: the path (e.g. /segmentations/mixed/predict); BENCH_BODIES: a file of one body a line.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")

local token = os.getenv("BENCH_TOKEN")
local path = os.getenv("BENCH_PATH")
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}
local requests = {}
for line in io.lines(os.getenv("BENCH_BODIES")) do
  requests[#requests + 1] = wrk.format("POST", path, headers, line)
end
local at = 0

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
  at = math.random(#requests) - 1
end

function request()
  at = at % #requests + 1
  return requests[at]
end
