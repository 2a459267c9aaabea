-- move_due.lua: move jobs that fell due from the timeline into their queues.
-- KEYS: the nine job-state keys, then the queues named by this batch.
-- ARGV: now, dispatcher channel, leader token, queue count n, the n queue
--       channels, then pairs (jobid, 1-based queue index).
-- A job no longer due (unset, set again) is skipped. Returns the count moved.
local failed = fence(ARGV[3])
if failed then return failed end
local n = tonumber(ARGV[4])
local moved = 0
for j = 5 + n, #ARGV, 2 do
  local jobid = ARGV[j]
  local score = redis.call('ZSCORE', TIMELINE, jobid)
  if score and tonumber(score) <= NOW_N then
    local qi = tonumber(ARGV[j + 1])
    redis.call('ZREM', TIMELINE, jobid)
    enqueue(jobid, KEYS[9 + qi], ARGV[4 + qi])
    moved = moved + 1
  end
end
return moved
