-- wrk script: the PHP library's form POST to /api/1/sms/out.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.body = "to=6421000000&body=Hello+%26+welcome+%3D+%C3%BC&messageId=abc-123&userId=bench&password=bench-password"
