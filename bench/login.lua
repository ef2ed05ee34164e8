-- POST /auth/login with the OAuth2 password form, as Swagger's Authorize does.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.body = "username=" .. os.getenv("BENCH_USERNAME") .. "&password=" .. os.getenv("BENCH_PASSWORD")
