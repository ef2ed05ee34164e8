-- POST /auth/login with the OAuth2 password form, as Swagger's Authorize does, cycling through
-- BENCH_USERNAMES (comma-separated) so no account has more than one login in flight.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")

local usernames = {}
for name in string.gmatch(os.getenv("BENCH_USERNAMES"), "[^,]+") do
  table.insert(usernames, name)
end
local password = os.getenv("BENCH_PASSWORD")
local headers = {["Content-Type"] = "application/x-www-form-urlencoded"}
local next_user = 0

function request()
  next_user = next_user % #usernames + 1
  return wrk.format("POST", "/auth/login", headers, "username=" .. usernames[next_user] .. "&password=" .. password)
end
