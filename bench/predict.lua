-- POST /predict as one logged-in user, a different customer on every request.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")

local token = os.getenv("BENCH_TOKEN")
local path = os.getenv("BENCH_PATH") or "/predict"  -- e.g. /predict?explain=true
local sexes = {"Male", "Female", "Other"}
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end

function request()
  local body = string.format(
    '{"sex":"%s","age":%d,"annual_income":%.1f,"spending_score":%d,"purchase_frequency":%d}',
    sexes[math.random(3)], math.random(18, 80), math.random(150, 2000) / 10,
    math.random(1, 100), math.random(0, 120))
  return wrk.format("POST", path, headers, body)
end
