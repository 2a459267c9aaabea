-- move_due.lua: move jobs that fell due from the timeline into their queues.
-- KEYS: the job-state keys, then the queues named by this batch.
-- ARGV: the common three, then leader token, queue count n, the n queue
--       channels, then pairs (jobid, 1-based queue index).
-- A job no longer due (unset, set again) is skipped. Returns the count moved.
local failed = L.fence(ARGV[L.A + 1])
if failed then return failed end
local n = L.int_of(ARGV[L.A + 2], 0, #KEYS - L.K)
if not n or n ~= #KEYS - L.K then return L.bad('queue count', ARGV[L.A + 2]) end
if (#ARGV - L.A - 2 - n) % 2 ~= 0 then return L.bad('count of job values', #ARGV) end
for j = L.A + 3 + n, #ARGV, 2 do
  if ARGV[j] == '' then return L.bad('job id', ARGV[j]) end
  if not L.int_of(ARGV[j + 1], 1, n) then return L.bad('queue index', ARGV[j + 1]) end
end
local moved = 0
for j = L.A + 3 + n, #ARGV, 2 do
  local jobid = ARGV[j]
  local score = redis.call('ZSCORE', L.TIMELINE, jobid)
  if score and tonumber(score) <= L.NOW_N then
    local qi = tonumber(ARGV[j + 1])
    redis.call('ZREM', L.TIMELINE, jobid)
    L.enqueue(jobid, KEYS[L.K + qi], ARGV[L.A + 2 + qi])
    moved = moved + 1
  end
end
return moved
