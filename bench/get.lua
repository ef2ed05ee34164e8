-- GET the URL given to wrk, with a bearer token when BENCH_TOKEN is set.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")

local token = os.getenv("BENCH_TOKEN")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
