-- move_due.lua: move jobs that fell due from the timeline into their queues.
-- KEYS: the job-state keys, then the queues named by this batch.
-- ARGV: the common three, then leader token, queue count n, the n queue
--       channels, then pairs (jobid, 1-based queue index).
-- A job no longer due (unset, set again) is skipped. Returns the count moved.
local failed = fence(ARGV[A + 1])
if failed then return failed end
local n = int_of(ARGV[A + 2], 0, #KEYS - K)
if not n or n ~= #KEYS - K then return bad('queue count', ARGV[A + 2]) end
if (#ARGV - A - 2 - n) % 2 ~= 0 then return bad('count of job values', #ARGV) end
for j = A + 3 + n, #ARGV, 2 do
  if ARGV[j] == '' then return bad('job id', ARGV[j]) end
  if not int_of(ARGV[j + 1], 1, n) then return bad('queue index', ARGV[j + 1]) end
end
local moved = 0
for j = A + 3 + n, #ARGV, 2 do
  local jobid = ARGV[j]
  local score = redis.call('ZSCORE', TIMELINE, jobid)
  if score and tonumber(score) <= NOW_N then
    local qi = tonumber(ARGV[j + 1])
    redis.call('ZREM', TIMELINE, jobid)
    enqueue(jobid, KEYS[K + qi], ARGV[A + 2 + qi])
    moved = moved + 1
  end
end
return moved
