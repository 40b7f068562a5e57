-- wrk script: the PHP library's form POST to /api/1/sms/out, a new messageId per request
-- (the gateway treats a repeated messageId as a retry and does not forward it again).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
local prefix = string.format("%x-%d", os.time(), math.random(1, 1000000000))
local n = 0
request = function()
   n = n + 1
   return wrk.format(nil, nil, nil,
      "to=6421000000&body=Hello+%26+welcome+%3D+%C3%BC&messageId=" .. prefix .. "-" .. n ..
      "&userId=bench&password=bench-password")
end
