-- reap.lua: end the runs whose lease deadline passed (their worker died or
-- stopped renewing) and put the jobs back by their schedules.
-- KEYS: the nine job-state keys, then the queues named by this batch.
-- ARGV: now, dispatcher channel, leader token, queue count n, the n queue
--       channels, then per lease 7 values: jobid, token, kind, at, status,
--       error JSON, 1-based queue index.
-- A lease renewed or ended meanwhile is left alone. Returns the count reaped.
local failed = fence(ARGV[3])
if failed then return failed end
local n = tonumber(ARGV[4])
local reaped = 0
for j = 5 + n, #ARGV, 7 do
  local jobid = ARGV[j]
  local deadline = redis.call('ZSCORE', DEADLINES, jobid)
  if deadline and tonumber(deadline) <= NOW_N then
    local qi = tonumber(ARGV[j + 6])
    local done = finish(jobid, ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], ARGV[j + 4], ARGV[j + 5],
      KEYS[9 + qi], ARGV[4 + qi])
    if done == 'DONE' or done == 'GONE' then reaped = reaped + 1 end
  end
end
return reaped
